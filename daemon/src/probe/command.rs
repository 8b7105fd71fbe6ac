//! Running the probe's external commands (`sysctl`, `ioreg`, `nvidia-smi`) without ever hanging or
//! failing the caller: a missing program, a non-zero exit or a timeout all mean "no answer".

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a probe command may take. `nvidia-smi` can stall for seconds while a driver
/// initializes; beyond this the field is reported unknown rather than delaying the daemon.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Stdout of `program args…` if it ran to a zero exit within `timeout`; `None` otherwise.
pub fn run_stdout(program: &str, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Read on a thread so a chatty command cannot block on a full pipe while we wait for it.
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let out = reader.join().ok()?.ok()?;
    status
        .success()
        .then(|| String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_of_a_successful_command() {
        let out = run_stdout("sh", &["-c", "echo hello"], COMMAND_TIMEOUT);
        assert_eq!(out.as_deref(), Some("hello\n"));
    }

    #[test]
    fn missing_program_failure_and_timeout_are_none() {
        assert_eq!(
            run_stdout("tilewise-no-such-program", &[], COMMAND_TIMEOUT),
            None
        );
        assert_eq!(
            run_stdout("sh", &["-c", "echo x; exit 3"], COMMAND_TIMEOUT),
            None
        );
        let start = Instant::now();
        assert_eq!(
            run_stdout("sleep", &["5"], Duration::from_millis(200)),
            None
        );
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
