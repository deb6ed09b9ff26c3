// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The packaged files agree with the program: the systemd unit passes `systemd-analyze
//! verify`, the daemon tells systemd when it is ready, the committed manual page is what the
//! CLI generates, the example configuration names every `serve` flag, and the maintainer
//! scripts work in a root without a running systemd.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-pcache");
const UNIT: &str = "packaging/systemd/vhost-user-pcache@.service";
const MAN_PAGE: &str = "packaging/man/vhost-user-pcache.1";
const EXAMPLE_CONFIG: &str = "packaging/config/example.toml";
const PACKAGED_BIN: &str = "/usr/bin/vhost-user-pcache";
/// How long the notification test waits for a datagram before declaring the daemon stuck.
const NOTIFY_LIMIT: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read_repo_file(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read_repo_file(UNIT);
    let exec = format!("ExecStart={PACKAGED_BIN} serve --config /etc/vhost-user-pcache/%i.toml");
    assert_eq!(
        unit.lines().filter(|l| *l == exec).count(),
        1,
        "the unit must start the packaged binary with the instance's config: {exec}"
    );
    // verify checks that the ExecStart binary exists; the packaged path does not here, so the
    // copy points at the binary cargo built (same arguments).
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("vhost-user-pcache@.service");
    std::fs::write(&template, unit.replace(PACKAGED_BIN, BIN)).unwrap();
    // verify also runs `man` for Documentation=man:...; show it the committed page.
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    std::fs::copy(repo_file(MAN_PAGE), man1.join("vhost-user-pcache.1")).unwrap();

    // An instance name, so the template's %i is expanded as for a real disk.
    let instance = dir.path().join("vhost-user-pcache@vm1-disk.service");
    let output = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .env("MANPATH", dir.path().join("man"))
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed; run vmm-tests/install-deps.sh (Debian package \
             `systemd`) to check the systemd unit"
        ),
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys and bad values are only warnings (exit status 0), so any output fails.
    assert!(
        output.status.success() && stderr.trim().is_empty() && output.stdout.is_empty(),
        "systemd-analyze verify {UNIT}: {}\n{stderr}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Sends the daemon SIGTERM when dropped, so a failing assertion does not leak it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("no notification from the daemon");
    String::from_utf8(buf[..n].to_vec()).expect("notification is UTF-8")
}

#[test]
fn daemon_notifies_systemd_when_listening_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(NOTIFY_LIMIT)).unwrap();
    let socket = dir.path().join("disk.sock");
    let image = dir.path().join("disk.img");

    let child = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--backing")
        .arg(&image)
        .args([
            "--create-backing",
            "16M",
            "--cache",
            "none",
            "--queues",
            "1",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vhost-user-pcache");
    let mut daemon = Running(child);

    assert_eq!(receive(&notify), "READY=1");
    // Ready means a frontend can connect now, without polling for the socket.
    UnixStream::connect(&socket).expect("socket accepts connections once READY=1 is sent");

    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_eq!(receive(&notify), "STOPPING=1");
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "daemon exited with {status}");
}

#[test]
fn committed_man_page_is_up_to_date() {
    let output = run(Command::new(BIN).arg("man"));
    assert!(output.status.success(), "vhost-user-pcache man failed");
    let committed = std::fs::read(repo_file(MAN_PAGE)).unwrap_or_default();
    assert!(
        committed == output.stdout,
        "{MAN_PAGE} is out of date with the command line; refresh it with\n    \
         cargo run -- man > {MAN_PAGE}"
    );
}

/// The long flags `serve --help` lists.
fn serve_flags() -> BTreeSet<String> {
    let output = run(Command::new(BIN).args(["serve", "--help"]));
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-h, ").unwrap_or(line);
            let flag = line.strip_prefix("--")?;
            let end = flag.find([' ', ',']).unwrap_or(flag.len());
            Some(flag[..end].to_string())
        })
        .collect()
}

/// Keys set or shown commented out (`# key = ...`) in the example configuration.
fn example_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            let (key, _) = line.split_once('=')?;
            let key = key.trim();
            (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                .then(|| key.to_string())
        })
        .collect()
}

#[test]
fn example_config_describes_every_serve_flag() {
    let mut flags = serve_flags();
    assert!(flags.contains("socket"), "help parsing found {flags:?}");
    // Not configuration keys: help, and the file naming itself.
    flags.remove("help");
    flags.remove("config");
    let keys = example_keys(&read_repo_file(EXAMPLE_CONFIG));
    let missing: Vec<_> = flags.difference(&keys).collect();
    assert!(
        missing.is_empty(),
        "{EXAMPLE_CONFIG} does not describe the serve flags {missing:?} (found keys {keys:?})"
    );
}

/// Runs a systemd tool on `input` (fed on stdin) inside the root directory `root`.
fn systemd_tool_in_root(tool: &str, args: &[&str], root: &Path, input: &str) -> Output {
    use std::io::Write;
    let mut child = match Command::new(tool)
        .arg(format!("--root={}", root.display()))
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "{tool} is not installed; run vmm-tests/install-deps.sh (Debian package `systemd`)"
        ),
        Err(e) => panic!("running {tool}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn sysusers_and_tmpfiles_create_the_service_user_and_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    // The unit's group; Debian creates it with udev.
    std::fs::write(root.path().join("etc/group"), "kvm:x:4242:\n").unwrap();

    let sysusers = read_repo_file("packaging/systemd/vhost-user-pcache.sysusers");
    let out = systemd_tool_in_root("systemd-sysusers", &[], root.path(), &sysusers);
    assert!(out.status.success(), "systemd-sysusers: {out:?}");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("vhost-user-pcache:"))
        .unwrap_or_else(|| panic!("no vhost-user-pcache user in {passwd}"));
    let fields: Vec<_> = user.split(':').collect();
    assert_eq!(fields[5], "/var/lib/vhost-user-pcache");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user, got uid {uid}");

    let tmpfiles = read_repo_file("packaging/systemd/vhost-user-pcache.tmpfile");
    let out = systemd_tool_in_root("systemd-tmpfiles", &["--create"], root.path(), &tmpfiles);
    assert!(out.status.success(), "systemd-tmpfiles: {out:?}");
    let state = std::fs::metadata(root.path().join("var/lib/vhost-user-pcache")).unwrap();
    assert_eq!((state.uid(), state.gid()), (uid, 4242));
    assert_eq!(state.permissions().mode() & 0o7777, 0o750);
    assert!(root.path().join("etc/vhost-user-pcache").is_dir());
}

/// Runs a maintainer script from `packaging/systemd` with `DPKG_ROOT` at `root`, as dpkg does
/// for an installation into another root.
fn maintainer_script(name: &str, arg: &str, root: &Path) -> Output {
    run(Command::new("sh")
        .arg(repo_file(&format!("packaging/systemd/{name}")))
        .arg(arg)
        .env("DPKG_ROOT", root))
}

#[test]
fn postinst_creates_the_directories_and_purge_removes_only_empty_ones() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::write(r.join("etc/group"), "kvm:x:4242:\n").unwrap();
    // What the package installs and cargo-deb's sysusers fragment applies before our part.
    std::fs::create_dir_all(r.join("usr/lib/tmpfiles.d")).unwrap();
    std::fs::write(
        r.join("usr/lib/tmpfiles.d/vhost-user-pcache.conf"),
        read_repo_file("packaging/systemd/vhost-user-pcache.tmpfile"),
    )
    .unwrap();
    let sysusers = read_repo_file("packaging/systemd/vhost-user-pcache.sysusers");
    assert!(systemd_tool_in_root("systemd-sysusers", &[], r, &sysusers)
        .status
        .success());

    // No systemd runs here, as in a container: the directories must be created all the same.
    let out = maintainer_script("postinst", "configure", r);
    assert!(out.status.success(), "postinst configure: {out:?}");
    let state = r.join("var/lib/vhost-user-pcache");
    let config = r.join("etc/vhost-user-pcache");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    assert!(config.is_dir());

    let out = maintainer_script("postrm", "remove", r);
    assert!(out.status.success(), "postrm remove: {out:?}");
    assert!(
        state.is_dir() && config.is_dir(),
        "remove keeps the directories"
    );

    // An image the operator keeps in the state directory survives a purge.
    std::fs::write(state.join("vm1.img"), b"disk").unwrap();
    let out = maintainer_script("postrm", "purge", r);
    assert!(out.status.success(), "postrm purge: {out:?}");
    assert!(!config.exists(), "purge leaves the empty {config:?}");
    assert_eq!(std::fs::read(state.join("vm1.img")).unwrap(), b"disk");

    std::fs::remove_file(state.join("vm1.img")).unwrap();
    assert!(maintainer_script("postrm", "purge", r).status.success());
    assert!(!state.exists(), "purge leaves the empty {state:?}");
}
