//! An initrd packed by the real `cpio` tool (GNU cpio, newc format) reads back intact.

use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::{Command, Stdio};

use kqemu_client::MemFs;

#[test]
fn memfs_from_gnu_cpio_archive() {
    let dir = std::env::temp_dir().join(format!("kqemu-client-cpio-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let big: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("bin/prog"), &big).unwrap();
    std::fs::set_permissions(dir.join("bin/prog"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::fs::write(dir.join("odd"), b"x").unwrap();
    std::fs::hard_link(dir.join("odd"), dir.join("odd-link")).unwrap();
    symlink("bin/prog", dir.join("prog-link")).unwrap();

    let mut child = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the cpio tool is missing: run `make deps`");
    let list = ".\nbin\nbin/prog\nempty\nodd\nodd-link\nprog-link\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(list.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    std::fs::remove_dir_all(&dir).unwrap();

    let fs = MemFs::from_cpio(&output.stdout).unwrap();
    assert_eq!(fs.read_file("/bin/prog"), Some(&big[..]));
    assert_eq!(fs.read_file("/prog-link"), Some(&big[..]));
    assert_eq!(fs.read_file("/odd"), Some(&b"x"[..]));
    assert_eq!(fs.read_file("/odd-link"), Some(&b"x"[..]));
    assert_eq!(fs.read_file("/empty"), None, "a directory is not a file");
    assert_eq!(fs.metadata("/bin/prog").map(|s| s.mode), Some(0o100751));
    assert_eq!(
        fs.metadata("/empty").map(|s| s.mode & 0o170000),
        Some(0o040000)
    );
    assert_eq!(
        fs.metadata("/odd").map(|s| s.nlink),
        Some(2),
        "hard link kept"
    );
    assert_eq!(fs.metadata("/dev/null").map(|s| s.rdev), Some(0x103));
}
