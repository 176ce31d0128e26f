//! flock-testapp: an append-only log served over TCP, kept in a directory (an application's
//! dataset), every append fsync'ed before it is acknowledged. flock's tests, examples and jepsen
//! workloads run it to check that data moves and survives with the application.
//!
//! ```text
//! flock-testapp [--data DIR] [--listen ADDR]
//!     DIR:  --data, else $FLOCK_DATASET_PATH, else the working directory
//!     ADDR: --listen, else 0.0.0.0:$PORT, else 0.0.0.0:8080
//! flock-testapp --ask HOST:PORT REQUEST     a client: sends REQUEST, prints the reply
//! ```
//!
//! One request per line, one reply line per request (READ: several, ended by `END`):
//!
//! ```text
//! APPEND <text>  -> OK <seq>              the entry is on disk (fsync'ed) when this is sent
//! COUNT          -> COUNT <n>
//! READ           -> <seq> <text> ... END   every entry, oldest first
//! PING           -> PONG <instance>         <instance>: unique to this process
//! ```
//!
//! The log is `DIR/log`, one `<seq> <text>` line per entry. At start a torn last line (a crash
//! during a write that was never acknowledged) is cut off.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

struct Log {
    file: File,
    entries: Vec<String>,
}

impl Log {
    fn open(dir: &Path) -> std::io::Result<Log> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log");
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&path)?;
        if created {
            File::open(dir)?.sync_all()?;
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let mut entries = Vec::new();
        let mut good = 0;
        for line in text.split_inclusive('\n') {
            let Some(body) = line.strip_suffix('\n') else {
                break; // torn: never acknowledged
            };
            let Some((seq, rest)) = body.split_once(' ') else {
                break;
            };
            if seq.parse::<usize>().ok() != Some(entries.len() + 1) {
                break;
            }
            entries.push(rest.to_string());
            good += line.len();
        }
        if good < text.len() {
            eprintln!(
                "flock-testapp: cutting {} bytes of a torn entry off {}",
                text.len() - good,
                path.display()
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Log { file, entries })
    }

    fn append(&mut self, text: &str) -> std::io::Result<usize> {
        let seq = self.entries.len() + 1;
        self.file.write_all(format!("{seq} {text}\n").as_bytes())?;
        self.file.sync_data()?;
        self.entries.push(text.to_string());
        Ok(seq)
    }
}

fn serve(stream: TcpStream, log: Arc<Mutex<Log>>, instance: &str) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match cmd {
            "APPEND" if !arg.is_empty() => {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                match log.append(arg) {
                    Ok(seq) => format!("OK {seq}\n"),
                    Err(e) => format!("ERR {e}\n"),
                }
            }
            "COUNT" => format!(
                "COUNT {}\n",
                log.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
            ),
            "READ" => {
                let log = log.lock().unwrap_or_else(|p| p.into_inner());
                let mut r = String::new();
                for (i, e) in log.entries.iter().enumerate() {
                    r.push_str(&format!("{} {e}\n", i + 1));
                }
                r.push_str("END\n");
                r
            }
            "PING" => format!("PONG {instance}\n"),
            _ => format!("ERR unknown request {line:?}: use APPEND <text>, COUNT, READ or PING\n"),
        };
        out.write_all(reply.as_bytes())?;
    }
    Ok(())
}

/// `--ask ADDR REQUEST`: one request as a client; exit 1 if the server cannot be reached.
fn ask(addr: &str, request: &str) -> ! {
    let run = || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.write_all(format!("{request}\n").as_bytes())?;
        for line in BufReader::new(s).lines() {
            let line = line?;
            println!("{line}");
            if request != "READ" || line == "END" {
                break;
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("flock-testapp: {addr}: {e}");
            std::process::exit(1);
        }
    }
}

const USAGE: &str = "usage: flock-testapp [--data DIR] [--listen ADDR]
       flock-testapp --ask HOST:PORT REQUEST
  DIR:  --data, else $FLOCK_DATASET_PATH, else the working directory
  ADDR: --listen, else 0.0.0.0:$PORT, else 0.0.0.0:8080
  an append-only log over TCP: APPEND <text>, COUNT, READ, PING (one request per line)";

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if matches!(argv.get(1).map(String::as_str), Some("--help" | "-h")) {
        println!("{USAGE}");
        return;
    }
    if argv.get(1).map(String::as_str) == Some("--ask") {
        match (argv.get(2), argv.get(3)) {
            (Some(addr), Some(req)) => ask(addr, req),
            _ => {
                eprintln!("usage: flock-testapp --ask HOST:PORT REQUEST");
                std::process::exit(2);
            }
        }
    }
    let mut args = std::env::args().skip(1);
    let mut data: Option<PathBuf> = std::env::var_os("FLOCK_DATASET_PATH").map(PathBuf::from);
    let mut listen = format!(
        "0.0.0.0:{}",
        std::env::var("PORT").unwrap_or_else(|_| "8080".into())
    );
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--data", Some(v)) => data = Some(PathBuf::from(v)),
            ("--listen", Some(v)) => listen = v,
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let dir = data.unwrap_or_else(|| PathBuf::from("."));
    let log = match Log::open(&dir) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => {
            eprintln!(
                "flock-testapp: cannot open the log in {}: {e}",
                dir.display()
            );
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("flock-testapp: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let instance = format!("{}-{nanos}", std::process::id());
    println!(
        "flock-testapp: serving {} entries from {} on {}",
        log.lock().unwrap_or_else(|p| p.into_inner()).entries.len(),
        dir.display(),
        listener
            .local_addr()
            .map_or(listen.clone(), |a| a.to_string())
    );
    let instance: &'static str = Box::leak(instance.into_boxed_str());
    for stream in listener.incoming().flatten() {
        let log = log.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, log, instance);
        });
    }
}
