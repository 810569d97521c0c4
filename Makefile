# sharedloop: build, install, demo, test.
#   make demo            build, install, mount a sample layered image, unmount
#   make check           run every test (root; real loop devices and mounts),
#                        then the kernel-surface rounds of check-kernels
#   make check-kernels   only those: a subset of the tests under RHEL 8's (4.18)
#                        and RHEL 9's (5.14) syscall surface, emulated by
#                        scripts/kernel-surface (seccomp ENOSYS, fake osrelease);
#                        SHAREDLOOP_TEST_KERNELS_FULL=1: every test under each;
#                        then a subset inside qemu on Debian 12's real 6.1
#                        kernel (tests/kernel_vm.rs; SHAREDLOOP_TEST_VM_FULL=1:
#                        all test binaries there, about 35 minutes)
#   make install DESTDIR=... PREFIX=...
#   make bench           mount benchmark against util-linux commands
#   make deb             Debian package target/sharedloop_VERSION_ARCH.deb
#   make rpm             RPM package from packaging/rpm/sharedloop.spec (needs rpmbuild)

PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
SBINDIR ?= /sbin
SYSCONFDIR ?= /etc
DOCDIR  ?= $(PREFIX)/share/doc/sharedloop
MANDIR  ?= $(PREFIX)/share/man
BASHCOMPDIR  ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR   ?= $(PREFIX)/share/zsh/site-functions
# udev and systemd read only these, whatever PREFIX the binaries use.
UDEVRULESDIR ?= /usr/lib/udev/rules.d
TMPFILESDIR  ?= /usr/lib/tmpfiles.d
CARGO   ?= cargo
# cargo's own variable, so that a build elsewhere (CARGO_TARGET_DIR=/tmp/x
# make deb) is the one installed.
CARGO_TARGET_DIR ?= target
export CARGO_TARGET_DIR
BIN      = $(CARGO_TARGET_DIR)/release/sharedloop

VERSION := $(shell sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
MANPAGES = man/sharedloop.8 man/mount.sharedloop.8 man/umount.sharedloop.8 man/sharedloop.conf.5
UDEV_RULES = $(wildcard udev/*.rules)
TMPFILES   = $(wildcard packaging/tmpfiles.d/*.conf)
MOUNT_UNITS = $(wildcard packaging/*.mount)
# The Debian package: layout of Debian 12 (helpers in /sbin, where mount(8)
# looks; udev and tmpfiles under /usr/lib).
DEB_ARCH = $(shell dpkg --print-architecture 2>/dev/null || echo unknown)
DEB_ROOT = target/deb-root
DEB      = target/sharedloop_$(VERSION)_$(DEB_ARCH).deb
RPMBUILD ?= rpmbuild
# rpmbuild on a Debian host has no RPM database to check BuildRequires in.
RPMBUILD_FLAGS ?= $(if $(wildcard /etc/debian_version),--nodeps)

.PHONY: all deps build install install-files uninstall demo check test check-kernels kernel-rounds bench clean deb rpm lint-man

all: build

deps:
	./scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked

# mount(8) runs /sbin/mount.TYPE and umount(8) /sbin/umount.TYPE; cargo
# cannot name a binary with a dot, so both are links to the one binary,
# which looks at argv[0].
install: build install-files

# Everything but the build: for packaging (make deb, the RPM spec).
install-files:
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/sharedloop
	install -d $(DESTDIR)$(SBINDIR)
	ln -sf $(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/mount.sharedloop
	ln -sf $(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/umount.sharedloop
	install -d $(DESTDIR)$(SYSCONFDIR)/sharedloop
	test -e $(DESTDIR)$(SYSCONFDIR)/sharedloop/sharedloop.conf || \
		install -m 0644 packaging/sharedloop.conf $(DESTDIR)$(SYSCONFDIR)/sharedloop/sharedloop.conf
	install -d $(DESTDIR)$(DOCDIR)/fstab.d
	install -m 0644 fstab.d/* $(DESTDIR)$(DOCDIR)/fstab.d/
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 $(filter %.5,$(MANPAGES)) $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 $(filter %.8,$(MANPAGES)) $(DESTDIR)$(MANDIR)/man8/
	install -D -m 0644 completions/sharedloop.bash $(DESTDIR)$(BASHCOMPDIR)/sharedloop
	install -D -m 0644 completions/_sharedloop $(DESTDIR)$(ZSHCOMPDIR)/_sharedloop
ifneq ($(UDEV_RULES),)
	install -d $(DESTDIR)$(UDEVRULESDIR)
	install -m 0644 $(UDEV_RULES) $(DESTDIR)$(UDEVRULESDIR)/
endif
ifneq ($(TMPFILES),)
	install -d $(DESTDIR)$(TMPFILESDIR)
	install -m 0644 $(TMPFILES) $(DESTDIR)$(TMPFILESDIR)/
endif
ifneq ($(MOUNT_UNITS),)
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 $(MOUNT_UNITS) $(DESTDIR)$(DOCDIR)/examples/
endif

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/sharedloop $(DESTDIR)$(SBINDIR)/mount.sharedloop $(DESTDIR)$(SBINDIR)/umount.sharedloop
	rm -rf $(DESTDIR)$(DOCDIR)
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man5/,$(notdir $(filter %.5,$(MANPAGES))))
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man8/,$(notdir $(filter %.8,$(MANPAGES))))
	rm -f $(DESTDIR)$(BASHCOMPDIR)/sharedloop $(DESTDIR)$(ZSHCOMPDIR)/_sharedloop
	rm -f $(addprefix $(DESTDIR)$(UDEVRULESDIR)/,$(notdir $(UDEV_RULES)))
	rm -f $(addprefix $(DESTDIR)$(TMPFILESDIR)/,$(notdir $(TMPFILES)))

demo: install
	./scripts/demo.sh $(IMAGE)

check test: deps
	$(CARGO) test --locked --features kernel-surface --lib --bins --tests -- --test-threads=4
	$(MAKE) --no-print-directory kernel-rounds

# Issue 9: cargo's runner wraps each test binary in scripts/kernel-surface,
# so the test and every command it spawns see the older kernel; the tests
# ask tests/common what that kernel has (kernel_surface, mount_apis) and
# take its fallbacks. Every surface runs, then the target fails if any did.
KERNEL_SURFACES ?= 4.18 5.14
KERNEL_TESTS = --test mount_basic --test mount_features --test status --test bad_input \
	--test hostile_store --test build_children --test failures
KERNEL_IMPORT_TESTS = layer_semantics_through_oci_and_docker_archive sigterm_undoes_everything \
	sigkill_leaves_only_staging_that_later_imports_ignore
KERNEL_TEST = CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$(CURDIR)/scripts/kernel-surface $$k" \
	$(CARGO) test --locked --features kernel-surface --no-fail-fast

check-kernels: deps
	$(MAKE) --no-print-directory kernel-rounds

kernel-rounds:
	@fail=; for k in $(KERNEL_SURFACES); do \
		echo "== kernel surface $$k"; start=$$(date +%s); \
		if [ -n "$$SHAREDLOOP_TEST_KERNELS_FULL" ]; then \
			$(KERNEL_TEST) --lib --bins --tests -- --test-threads=4 || fail="$$fail $$k"; \
		else \
			$(KERNEL_TEST) $(KERNEL_TESTS) -- --test-threads=4 || fail="$$fail $$k"; \
			$(KERNEL_TEST) --test import -- --test-threads=4 $(KERNEL_IMPORT_TESTS) || fail="$$fail $$k(import)"; \
		fi; \
		echo "== kernel surface $$k: $$(( $$(date +%s) - start )) s"; \
	done; \
	echo "== Debian 12's 6.1 kernel under qemu"; start=$$(date +%s); \
	SHAREDLOOP_TEST_VM=1 $(CARGO) test --locked --features kernel-surface --test kernel_vm -- --nocapture || fail="$$fail 6.1(qemu)"; \
	echo "== 6.1 under qemu: $$(( $$(date +%s) - start )) s"; \
	if [ -n "$$fail" ]; then echo "kernel surfaces failed:$$fail"; exit 1; fi

bench: deps
	$(CARGO) bench --locked --bench mount

clean:
	$(CARGO) clean

# A Debian package without debhelper: the tree from install-files, then
# packaging/debian/build-deb.sh (strip, gzip, control, md5sums, dpkg-deb).
deb: build
	rm -rf $(DEB_ROOT)
	$(MAKE) --no-print-directory install-files DESTDIR=$(CURDIR)/$(DEB_ROOT) \
		PREFIX=/usr BINDIR=/usr/bin SBINDIR=/sbin SYSCONFDIR=/etc \
		DOCDIR=/usr/share/doc/sharedloop MANDIR=/usr/share/man \
		BASHCOMPDIR=/usr/share/bash-completion/completions \
		ZSHCOMPDIR=/usr/share/zsh/vendor-completions \
		UDEVRULESDIR=/usr/lib/udev/rules.d TMPFILESDIR=/usr/lib/tmpfiles.d
	packaging/debian/build-deb.sh $(DEB_ROOT) $(VERSION) $(DEB_ARCH) $(DEB)

# Binary RPM, built in place (the spec's %build reuses this tree's cargo
# build); the result is copied to target/.
rpm: build
	rm -rf target/rpmbuild
	mkdir -p target/rpmbuild
	$(RPMBUILD) -bb --build-in-place $(RPMBUILD_FLAGS) \
		--define "_topdir $(CURDIR)/target/rpmbuild" packaging/rpm/sharedloop.spec
	cp target/rpmbuild/RPMS/*/sharedloop-$(VERSION)-*.rpm target/

# The man pages must format without a single warning.
lint-man:
	@for f in $(MANPAGES); do \
		out=$$(MANWIDTH=80 man --warnings -l $$f 2>&1 >/dev/null; groff -man -ww -z $$f 2>&1); \
		if [ -n "$$out" ]; then echo "$$f:"; echo "$$out"; exit 1; fi; \
	done; echo "man pages: no warnings"
