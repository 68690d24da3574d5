//! One swtpm per test: free ports, a temporary state folder, killed on drop (also when the
//! test fails). Every state folder's name starts with `keygate-test-swtpm` so the suite can
//! check that no simulator outlives it (softhsm-tests/run-all.sh).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    pub state: TempDir,
}

/// A port P with P and P+1 both free (swtpm's server and control channels), outside the
/// ephemeral range so that a restart finds them free again.
fn free_port_pair() -> u16 {
    super::free_ports(2)
}

fn spawn(port: u16, state: &Path) -> Child {
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--server"])
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swtpm is installed (softhsm-tests/install-deps.sh)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "swtpm did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Swtpm {
    pub fn start() -> Swtpm {
        let state = tempfile::Builder::new()
            .prefix("keygate-test-swtpm")
            .tempdir()
            .unwrap();
        let port = free_port_pair();
        let child = spawn(port, state.path());
        Swtpm {
            child: Some(child),
            port,
            state,
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Kills the simulator (the TPM "goes away"); its state folder stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and state folder.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(spawn(self.port, self.state.path()));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
