//! What the end-to-end tests share: finding the services `./test` started, running the real
//! `quikapp` binary, and bounded waits. Each test file uses a part of it.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[allow(unused_imports)]
pub use quikapp_commands::store::contract::{fresh_postgres_database, scratch_dir, service_url};

/// Runs `work` until it finishes or `limit` passes; `None` means it did not finish in time.
pub async fn deadline<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, work).await.ok()
}

/// `quikapp` with no `QUIKAPP_*` configuration inherited from the environment.
pub fn quikapp(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quikapp"));
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("QUIKAPP_") {
            command.env_remove(name);
        }
    }
    command
}

/// A running role; killed when dropped.
pub struct Running {
    pub child: Child,
    /// The base URL it printed, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// Every URL it was waited for by, by what printed it (`write API`, `read API`, ...).
    pub urls: std::collections::HashMap<String, String>,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `command` and waits (bounded) for the line `<what> listening on <url>`.
    pub fn start(command: Command, what: &str) -> Running {
        Running::start_all(command, &[what])
    }

    /// Starts `command` and waits (bounded) for a `<what> listening on <url>` line of each of
    /// `whats`; `url` is the first one's.
    pub fn start_all(mut command: Command, whats: &[&str]) -> Running {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start quikapp");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut urls = std::collections::HashMap::new();
        while urls.len() < whats.len() {
            match lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some((what, url)) = line.split_once(" listening on ")
                        && whats.contains(&what)
                    {
                        urls.insert(what.to_owned(), url.to_owned());
                    }
                }
                Err(_) => panic!("quikapp did not print `<{whats:?}> listening on …` within a minute"),
            }
        }
        Running { child, url: urls[whats[0]].clone(), urls, lines }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("quikapp did not stop within 30 s of SIGTERM");
    }
}
