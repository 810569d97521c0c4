# sharedloop: build, install, demo, test.
#   make demo            build, install, mount a sample layered image, unmount
#   make check           run every test (root; real loop devices and mounts)
#   make install DESTDIR=... PREFIX=...
#   make bench           mount benchmark against util-linux commands

PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
SBINDIR ?= /sbin
SYSCONFDIR ?= /etc
DOCDIR  ?= $(PREFIX)/share/doc/sharedloop
CARGO   ?= cargo
BIN      = target/release/sharedloop

.PHONY: all deps build install uninstall demo check test bench clean

all: build

deps:
	./scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked

# mount(8) runs /sbin/mount.TYPE and umount(8) /sbin/umount.TYPE; cargo
# cannot name a binary with a dot, so both are links to the one binary,
# which looks at argv[0].
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/sharedloop
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/mount.sharedloop
	ln -sf $(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/umount.sharedloop
	install -d $(DESTDIR)$(SYSCONFDIR)/sharedloop
	test -e $(DESTDIR)$(SYSCONFDIR)/sharedloop/sharedloop.conf || \
		install -m 0644 packaging/sharedloop.conf $(DESTDIR)$(SYSCONFDIR)/sharedloop/sharedloop.conf
	install -d $(DESTDIR)$(DOCDIR)/fstab.d
	install -m 0644 fstab.d/* $(DESTDIR)$(DOCDIR)/fstab.d/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/mount.sharedloop $(DESTDIR)$(SBINDIR)/umount.sharedloop
	rm -rf $(DESTDIR)$(DOCDIR)

demo: install
	./scripts/demo.sh $(IMAGE)

check test: deps
	$(CARGO) test --locked -- --test-threads=4

bench: deps
	$(CARGO) bench --locked --bench mount

clean:
	$(CARGO) clean
