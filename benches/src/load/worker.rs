//! Fleets in worker processes, for more sessions than one process has file descriptors for.
//!
//! The coordinator starts `vane-load --worker` once per share and talks to each over its stdin
//! and stdout, one JSON line per message: first the [`FleetSpec`], then [`Command`]s, each
//! answered by one line. A worker stops after `Finish`, or when its stdin closes (the
//! coordinator is gone), and the coordinator kills workers it drops.

use std::path::Path;
use std::process::Stdio;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use super::fleet::{Fleet, FleetSpec, Observations, Status};

/// What the coordinator asks of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Answer with the fleet's [`Status`].
    Status {
        /// The version to count sessions at.
        version: u64,
        /// The moment (Unix ns) after which catch-ups count as resumptions.
        since_ns: u128,
    },
    /// Turn byte counting on or off; answered with `null`.
    Counting {
        /// On or off.
        on: bool,
    },
    /// Stop the sessions and answer with the [`Observations`]; the worker then exits.
    Finish,
}

/// A worker process running one fleet.
#[derive(Debug)]
pub struct Worker {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts `exe --worker` and hands it the fleet to run.
    pub async fn spawn(exe: &Path, spec: &FleetSpec) -> Result<Worker, String> {
        let mut child = Process::new(exe)
            .arg("--worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting worker {}: {e}", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("worker without pipes".into());
        };
        let mut worker = Worker {
            _child: child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        };
        worker.send(spec).await?;
        Ok(worker)
    }

    /// Sends a command and reads its answer.
    pub async fn call<T: DeserializeOwned>(&mut self, command: &Command) -> Result<T, String> {
        self.send(command).await?;
        let line = self
            .stdout
            .next_line()
            .await
            .map_err(|e| format!("worker: {e}"))?
            .ok_or("worker exited (its error is above)")?;
        serde_json::from_str(&line).map_err(|e| format!("worker answer: {e}"))
    }

    async fn send(&mut self, message: &impl Serialize) -> Result<(), String> {
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .await
            .map_err(|e| format!("worker: {e}"))
    }
}

/// The worker's side: reads the spec, runs the fleet, answers commands until `Finish` or the
/// end of input.
pub async fn serve(
    input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> Result<(), String> {
    let mut lines = BufReader::new(input).lines();
    let mut next = async || -> Result<Option<String>, String> {
        lines.next_line().await.map_err(|e| e.to_string())
    };
    let spec: FleetSpec = match next().await? {
        Some(line) => serde_json::from_str(&line).map_err(|e| format!("fleet spec: {e}"))?,
        None => return Ok(()),
    };
    let fleet = Fleet::start(spec)?;
    while let Some(line) = next().await? {
        let answer = match serde_json::from_str(&line).map_err(|e| format!("command: {e}"))? {
            Command::Status { version, since_ns } => to_line(&fleet.status(version, since_ns))?,
            Command::Counting { on } => {
                fleet.set_counting(on);
                to_line(&())?
            }
            Command::Finish => {
                let observations: Observations = fleet.finish().await;
                return reply(&mut output, to_line(&observations)?).await;
            }
        };
        reply(&mut output, answer).await?;
    }
    Ok(())
}

fn to_line(value: &impl Serialize) -> Result<Vec<u8>, String> {
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    Ok(line)
}

async fn reply(output: &mut (impl AsyncWrite + Unpin), line: Vec<u8>) -> Result<(), String> {
    output.write_all(&line).await.map_err(|e| e.to_string())?;
    output.flush().await.map_err(|e| e.to_string())
}

/// A fleet, here or in a worker: the coordinator treats both alike.
#[derive(Debug)]
pub enum Part {
    /// Sessions in this process.
    Local(Fleet),
    /// Sessions in a worker process.
    Remote(Worker),
}

impl Part {
    /// See [`Fleet::status`].
    pub async fn status(&mut self, version: u64, since_ns: u128) -> Result<Status, String> {
        match self {
            Part::Local(f) => Ok(f.status(version, since_ns)),
            Part::Remote(w) => w.call(&Command::Status { version, since_ns }).await,
        }
    }

    /// See [`Fleet::set_counting`].
    pub async fn set_counting(&mut self, on: bool) -> Result<(), String> {
        match self {
            Part::Local(f) => {
                f.set_counting(on);
                Ok(())
            }
            Part::Remote(w) => w.call(&Command::Counting { on }).await,
        }
    }

    /// See [`Fleet::finish`].
    pub async fn finish(self) -> Result<Observations, String> {
        match self {
            Part::Local(f) => Ok(f.finish().await),
            Part::Remote(mut w) => w.call(&Command::Finish).await,
        }
    }
}
