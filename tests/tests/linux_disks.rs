//! Disks under a real guest: Debian's kernel on `--engine bt` loads its own drivers (ata_piix,
//! sd_mod, sr_mod, virtio_blk) from the initramfs, makes and fills filesystems, and the host
//! checks the image files with e2fsprogs (`e2fsck -fn`, `debugfs`), as the issue asks.
//!
//! Each test appends a script (`/bt86/run.sh`) and data files to the guest's initramfs; the
//! guest prints `BT86-TEST: ...` lines the test reads, and ends with `reboot -f` (bt86 exits 0
//! through the keyboard controller's reset line).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bt86_tests::linux_guest::{Ended, GUEST_LIB, LinuxGuest, Session, test_bytes};

/// Safety net for one boot (a hung guest); the tests never assert on time.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// Files the guest copies onto its disks: (name, contents). One is larger than a few MiB so
/// that writes span many requests and several block groups' worth of data.
fn payload() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello.txt", b"hello from the bt86 guest\n".to_vec()),
        ("odd.bin", test_bytes(7, 70_001)),
        ("big.bin", test_bytes(11, 6 * 1024 * 1024 + 123)),
    ]
}

/// Why a test cannot run here, if it cannot: no guest, no release build, or a host tool missing.
fn skip_reason(tools: &[&str]) -> Option<String> {
    if let Err(why) = LinuxGuest::find() {
        return Some(why);
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool} || test -x /sbin/{tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    None
}

fn skip(test: &str, tools: &[&str]) -> bool {
    match skip_reason(tools) {
        Some(why) => {
            eprintln!("{test}: skipped: {why}");
            true
        }
        None => false,
    }
}

/// Boots the guest with `script` (after the helpers) and `data` under /bt86/data, the drive
/// options `drives`, and returns the started session.
fn boot(
    dir: &Path,
    name: &str,
    script: &str,
    data: &[(&str, Vec<u8>)],
    drives: &[&str],
) -> Session {
    let guest = LinuxGuest::find().expect("checked by skip");
    let script = format!("{GUEST_LIB}\n{script}");
    let mut files: Vec<(String, &[u8], u32)> =
        vec![("bt86/run.sh".into(), script.as_bytes(), 0o755)];
    for (file, bytes) in data {
        files.push((format!("bt86/data/{file}"), bytes, 0o644));
    }
    let files: Vec<(&str, &[u8], u32)> =
        files.iter().map(|(p, d, m)| (p.as_str(), *d, *m)).collect();
    let initrd = dir.join(format!("{name}.initrd"));
    std::fs::write(&initrd, guest.initrd_with(&files).unwrap()).unwrap();
    Session::start(guest.command("bt", &initrd, drives)).unwrap()
}

/// Runs a boot to its end and checks that the guest finished its script and bt86 exited 0.
fn boot_to_end(
    dir: &Path,
    name: &str,
    script: &str,
    data: &[(&str, Vec<u8>)],
    drives: &[&str],
) -> Ended {
    let mut s = boot(dir, name, script, data, drives);
    if let Err(e) = s.wait_for("end", BOOT_LIMIT) {
        panic!("{name}: {e}");
    }
    let ended = s.wait(BOOT_LIMIT);
    assert_eq!(
        ended.status.code(),
        Some(0),
        "{name}: bt86 did not exit 0; stderr: {}\nconsole:\n{}",
        ended.stderr,
        ended.tail()
    );
    ended
}

/// Lines the guest printed that start with `prefix`, without it.
fn lines_with(ended: &Ended, prefix: &str) -> Vec<String> {
    ended
        .marked()
        .iter()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .collect()
}

/// The kernel's complaints about a disk controller (timeouts, failed commands, resets): there
/// must be none.
fn assert_no_controller_trouble(name: &str, ended: &Ended) {
    let trouble: Vec<String> = lines_with(ended, "dmesg: ")
        .into_iter()
        .filter(|l| !l.contains("I/O error") || !l.contains("sr0"))
        .collect();
    assert!(
        trouble.is_empty(),
        "{name}: the kernel complained:\n{}",
        trouble.join("\n")
    );
}

fn sparse_image(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// `debugfs -R 'cat /NAME' IMAGE`: a file's contents as e2fsprogs reads them from the image.
fn debugfs_cat(image: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{name}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs cat /{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `e2fsck -fn IMAGE`: a forced, read-only check; exit status 0 means a clean filesystem.
fn assert_fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn md5_hex(data: &[u8], dir: &Path) -> String {
    let f = dir.join("md5-input");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("md5sum").arg(&f).output().expect("run md5sum");
    std::fs::remove_file(&f).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The guest script that makes an ext2 filesystem on DEV, copies the payload onto it (and into
/// a subdirectory), syncs and unmounts.
fn mkfs_and_fill(dev: &str, modules: &str) -> String {
    format!(
        r#"
for m in {modules}; do modprobe $m || mark "modprobe $m failed"; done
wait_dev {dev} && mark "device {dev}"
mke2fs -F {dev} >/dev/null && mark "mkfs done"
mount -t ext2 {dev} /mnt && mark "mounted"
mkdir /mnt/sub
for f in /bt86/data/*; do cp $f /mnt/ && cp $f /mnt/sub/; done
sync && mark "synced"
umount /mnt && mark "unmounted"
finish
"#
    )
}

/// The second boot: mount the disk and print each file's md5sum.
fn mount_and_sum(dev: &str, modules: &str) -> String {
    format!(
        r#"
for m in {modules}; do modprobe $m || mark "modprobe $m failed"; done
wait_dev {dev} && mark "device {dev}"
mount -t ext2 {dev} /mnt && mark "mounted"
cd /mnt && md5sum * sub/* 2>&1 | sed 's/^/BT86-TEST: md5 /'
cd / && umount /mnt && mark "unmounted"
finish
"#
    )
}

/// The Linux proof on one disk interface: mkfs + files on the first boot, host checks with
/// e2fsprogs, files found again (md5sum) on a second boot.
fn filesystem_round_trip(name: &str, dev: &str, modules: &str, drive: impl Fn(&Path) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 64 << 20);
    let data = payload();
    let drive_arg = drive(&image);

    let first = boot_to_end(
        dir.path(),
        name,
        &mkfs_and_fill(dev, modules),
        &data,
        &["--disk", &drive_arg],
    );
    let marks = first.marked();
    for step in ["mkfs done", "mounted", "synced", "unmounted"] {
        assert!(
            marks.iter().any(|m| m == step),
            "{name}: the guest never printed {step:?}:\n{}",
            first.tail()
        );
    }
    assert_no_controller_trouble(name, &first);

    assert_fsck_clean(&image);
    for (file, bytes) in &data {
        for path in [file.to_string(), format!("sub/{file}")] {
            assert!(
                debugfs_cat(&image, &path) == *bytes,
                "{name}: /{path} in the image differs from what the guest wrote"
            );
        }
    }

    let second = boot_to_end(
        dir.path(),
        name,
        &mount_and_sum(dev, modules),
        &[],
        &["--disk", &drive_arg],
    );
    assert_no_controller_trouble(name, &second);
    let sums = lines_with(&second, "md5 ");
    for (file, bytes) in &data {
        let want = md5_hex(bytes, dir.path());
        for path in [file.to_string(), format!("sub/{file}")] {
            assert!(
                sums.iter()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>()
                        == [want.as_str(), path.as_str()]),
                "{name}: second boot: no md5 {want} for {path}; the guest printed:\n{}",
                sums.join("\n")
            );
        }
    }
}

#[test]
fn ide_disk_gets_an_ext2_filesystem_that_e2fsck_and_a_second_boot_accept() {
    if skip("ide_disk_gets_an_ext2_filesystem", &["e2fsck", "debugfs"]) {
        return;
    }
    filesystem_round_trip(
        "ide",
        "/dev/sda",
        "ata_piix sd_mod crc32c_generic ext4",
        |p| p.display().to_string(),
    );
}

/// The same proof on a virtio disk (/dev/vda through virtio_pci and virtio_blk).
#[test]
fn virtio_disk_gets_an_ext2_filesystem_that_e2fsck_and_a_second_boot_accept() {
    if skip(
        "virtio_disk_gets_an_ext2_filesystem",
        &["e2fsck", "debugfs"],
    ) {
        return;
    }
    filesystem_round_trip(
        "virtio",
        "/dev/vda",
        "virtio_pci virtio_blk crc32c_generic ext4",
        |p| format!("{},if=virtio", p.display()),
    );
}

/// The guest script for the SIGKILL proof: a filesystem with the payload, `sync`, then a mark
/// and a busy loop; the test kills bt86 as soon as it sees the mark.
fn fill_sync_and_spin(dev: &str, modules: &str) -> String {
    format!(
        r#"
for m in {modules}; do modprobe $m || mark "modprobe $m failed"; done
wait_dev {dev} && mark "device {dev}"
mke2fs -F {dev} >/dev/null && mark "mkfs done"
mount -t ext2 {dev} /mnt && mark "mounted"
for f in /bt86/data/*; do cp $f /mnt/; done
sync && mark "sync completed"
while :; do :; done
"#
    )
}

/// SIGKILL right after the guest reports a completed `sync`: every file is in the image when
/// the host looks after the kill (debugfs; the filesystem was never unmounted).
fn killed_after_sync(name: &str, dev: &str, modules: &str, drive: impl Fn(&Path) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 64 << 20);
    let data = payload();
    let drive_arg = drive(&image);
    let mut s = boot(
        dir.path(),
        name,
        &fill_sync_and_spin(dev, modules),
        &data,
        &["--disk", &drive_arg],
    );
    if let Err(e) = s.wait_for("sync completed", BOOT_LIMIT) {
        panic!("{name}: {e}");
    }
    let ended = s.kill();
    assert_ne!(
        ended.status.code(),
        Some(0),
        "{name}: bt86 was killed, not ended"
    );
    for (file, bytes) in &data {
        assert!(
            debugfs_cat(&image, file) == *bytes,
            "{name}: /{file} in the image after SIGKILL differs from what the guest synced"
        );
    }
}

#[test]
fn virtio_data_synced_before_a_sigkill_is_in_the_image() {
    if skip("virtio_data_synced_before_a_sigkill", &["debugfs"]) {
        return;
    }
    killed_after_sync(
        "virtio-kill",
        "/dev/vda",
        "virtio_pci virtio_blk crc32c_generic ext4",
        |p| format!("{},if=virtio", p.display()),
    );
}

#[test]
fn ide_data_synced_before_a_sigkill_is_in_the_image() {
    if skip("ide_data_synced_before_a_sigkill", &["debugfs"]) {
        return;
    }
    killed_after_sync(
        "ide-kill",
        "/dev/sda",
        "ata_piix sd_mod crc32c_generic ext4",
        |p| p.display().to_string(),
    );
}

/// An ext2 image made on the host (mke2fs -d) holding the payload.
fn host_ext2_image(dir: &Path, data: &[(&str, Vec<u8>)]) -> std::path::PathBuf {
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    for (name, bytes) in data {
        std::fs::write(files.join(name), bytes).unwrap();
    }
    let image = dir.join("ro.img");
    sparse_image(&image, 32 << 20);
    let out = Command::new("mke2fs")
        .args(["-F", "-q", "-t", "ext2", "-d"])
        .arg(&files)
        .arg(&image)
        .output()
        .expect("run mke2fs");
    assert!(
        out.status.success(),
        "mke2fs -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// The guest script for the read-only proof: mount (read-only if the read-write mount fails: an
/// IDE disk cannot tell the guest it is write-protected, so there the mount's own superblock
/// write is the first write that fails), read the files, then try to write through the
/// filesystem and to the raw device.
fn read_and_try_to_write(dev: &str, modules: &str) -> String {
    format!(
        r#"
for m in {modules}; do modprobe $m || mark "modprobe $m failed"; done
wait_dev {dev} && mark "device {dev}"
if mount -t ext2 {dev} /mnt 2>/dev/null; then mark "mounted"
else mark "read-write mount refused"; mount -t ext2 -o ro {dev} /mnt && mark "mounted"; fi
cd /mnt && md5sum * 2>&1 | sed 's/^/BT86-TEST: md5 /'
cd /
if touch /mnt/new-file 2>/dev/null; then mark "file write succeeded"; else mark "file write refused"; fi
umount /mnt
if dd if=/dev/zero of={dev} bs=4096 count=16 conv=fsync 2>/dev/null; then mark "raw write succeeded"; else mark "raw write refused"; fi
finish
"#
    )
}

/// A `readonly` image is byte-identical after a guest that tried to write to it, and the guest
/// saw the writes fail.
fn read_only_stays_untouched(
    name: &str,
    dev: &str,
    modules: &str,
    drive: impl Fn(&Path) -> String,
) {
    let dir = tempfile::tempdir().unwrap();
    let data = payload();
    let image = host_ext2_image(dir.path(), &data);
    let before = std::fs::read(&image).unwrap();
    let ended = boot_to_end(
        dir.path(),
        name,
        &read_and_try_to_write(dev, modules),
        &[],
        &["--disk", &drive(&image)],
    );
    let marks = ended.marked();
    for m in ["mounted", "file write refused", "raw write refused"] {
        assert!(
            marks.iter().any(|l| l == m),
            "{name}: the guest never printed {m:?}:\n{}",
            ended.tail()
        );
    }
    let sums = lines_with(&ended, "md5 ");
    for (file, bytes) in &data {
        let want = md5_hex(bytes, dir.path());
        assert!(
            sums.iter()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [want.as_str(), *file]),
            "{name}: no md5 {want} for {file}; the guest printed:\n{}",
            sums.join("\n")
        );
    }
    assert!(
        std::fs::read(&image).unwrap() == before,
        "{name}: the read-only image changed"
    );
}

#[test]
fn virtio_read_only_image_is_never_modified() {
    if skip("virtio_read_only_image", &["mke2fs"]) {
        return;
    }
    read_only_stays_untouched(
        "virtio-ro",
        "/dev/vda",
        "virtio_pci virtio_blk crc32c_generic ext4",
        |p| format!("{},readonly,if=virtio", p.display()),
    );
}

#[test]
fn ide_read_only_image_is_never_modified() {
    if skip("ide_read_only_image", &["mke2fs"]) {
        return;
    }
    read_only_stays_untouched(
        "ide-ro",
        "/dev/sda",
        "ata_piix sd_mod crc32c_generic ext4",
        |p| format!("{},readonly", p.display()),
    );
}

/// An ISO 9660 image (genisoimage, Rock Ridge) in the ATAPI CD-ROM drive: the guest mounts it
/// and reads every file with the right content.
#[test]
fn iso_image_on_the_cdrom_mounts_and_reads_back() {
    if skip("iso_image_on_the_cdrom", &["genisoimage"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = payload();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    for (name, bytes) in &data {
        std::fs::write(files.join(name), bytes).unwrap();
    }
    let iso = dir.path().join("cd.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-R", "-V", "BT86CD", "-o"])
        .arg(&iso)
        .arg(&files)
        .output()
        .expect("run genisoimage");
    assert!(
        out.status.success(),
        "genisoimage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = r#"
for m in ata_piix sr_mod isofs; do modprobe $m || mark "modprobe $m failed"; done
wait_dev /dev/sr0 && mark "device /dev/sr0"
mount -t iso9660 -o ro /dev/sr0 /mnt && mark "mounted"
cd /mnt && md5sum * 2>&1 | sed 's/^/BT86-TEST: md5 /'
cd / && umount /mnt && mark "unmounted"
finish
"#;
    let ended = boot_to_end(
        dir.path(),
        "cdrom",
        script,
        &[],
        &["--cdrom", &iso.display().to_string()],
    );
    assert_no_controller_trouble("cdrom", &ended);
    let marks = ended.marked();
    assert!(
        marks.iter().any(|m| m == "mounted"),
        "cdrom: not mounted:\n{}",
        ended.tail()
    );
    let sums = lines_with(&ended, "md5 ");
    for (file, bytes) in &data {
        let want = md5_hex(bytes, dir.path());
        assert!(
            sums.iter()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [want.as_str(), *file]),
            "cdrom: no md5 {want} for {file}; the guest printed:\n{}",
            sums.join("\n")
        );
    }
}
