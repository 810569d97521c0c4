//! The merged view through real mount(8)/umount(8), in a private namespace.

mod common;
use common::*;

fn three_layers(env: &Env) -> String {
    let a = env.add(None, None, &[
        ("a.txt", E::File("from a\n")),
        ("shadow.txt", E::File("a\n")),
        ("gone.txt", E::File("a\n")),
        ("opq/old.txt", E::File("old\n")),
    ]);
    let b = env.add(Some(&a), None, &[("b.txt", E::File("from b\n")), ("shadow.txt", E::File("b\n"))]);
    env.add(Some(&b), Some("demo:1"), &[
        ("c.txt", E::File("from c\n")),
        ("gone.txt", E::Whiteout),
        ("opq", E::Opaque),
        ("opq/new.txt", E::File("new\n")),
    ])
}

#[test]
fn merged_view_through_mount8() {
    let env = Env::new("merged");
    let top = three_layers(&env);
    let m = env.mnt("m");
    let ms = m.to_str().unwrap();
    env.run(&["mount", "-t", "sharedloop", &top, ms, "-o", &env.store_opts()]).ok();

    assert_eq!(list_in(&env, &m), vec!["a.txt", "b.txt", "c.txt", "opq", "shadow.txt"]);
    assert_eq!(read_in(&env, &m.join("a.txt")).as_deref(), Some("from a\n"));
    assert_eq!(read_in(&env, &m.join("b.txt")).as_deref(), Some("from b\n"));
    assert_eq!(read_in(&env, &m.join("c.txt")).as_deref(), Some("from c\n"));
    assert_eq!(read_in(&env, &m.join("shadow.txt")).as_deref(), Some("b\n"));
    assert_eq!(list_in(&env, &m.join("opq")), vec!["new.txt"]);

    // Only the overlay shows, with SOURCE as its source; read-only without upper.
    let (src, sopts) = env.overlay_at(&m).expect("overlay at target");
    assert_eq!(src, top);
    assert!(sopts.starts_with("ro,"), "{sopts}");
    assert_eq!(env.my_mounts().len(), 1, "{:#?}", env.my_mounts());
    assert_eq!(env.my_loops().len(), 3);
    assert!(env.utab().contains(&format!("SRC={top} TARGET={ms} ROOT=/ OPTS=helper=sharedloop")), "{}", env.utab());

    env.run(&["umount", ms]).ok();
    assert!(env.overlay_at(&m).is_none());
    assert!(env.my_loops().is_empty(), "umount returned before loops were freed: {:?}", env.my_loops());
    assert_eq!(env.utab(), "");
    env.assert_clean();
}
