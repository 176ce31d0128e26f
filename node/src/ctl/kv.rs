//! `flockctl kv ...`: the replicated key-value namespace.

use clap::Subcommand;
use serde::Serialize;
use tonic::transport::Channel;

use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;
use flock_scheduler::shown;

use super::output::{cell, print_json, status_err, table, EXIT_CAS_FAILED, EXIT_NOT_FOUND};

/// `flockctl kv ...`.
#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value to set.
        value: String,
    },
    /// Print KEY's value (exit code 4 when it does not exist).
    Get {
        /// The key.
        key: String,
        /// Read this node's replica without asking the leader: fast, possibly old.
        #[arg(long)]
        stale: bool,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE only if it holds OLD now (exit code 3 when it does not).
    Cas {
        /// The key.
        key: String,
        /// The value KEY must hold.
        #[arg(long, required_unless_present = "absent", conflicts_with = "absent")]
        expect: Option<String>,
        /// Instead of --expect: KEY must not exist.
        #[arg(long)]
        absent: bool,
        /// The value to set.
        value: String,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY.
    Rm {
        /// The key.
        key: String,
    },
    /// List keys starting with PREFIX (all keys without one).
    Ls {
        /// Only keys starting with this (all keys when left out).
        prefix: Option<String>,
        /// Read this node's replica without asking the leader: fast, possibly old.
        #[arg(long)]
        stale: bool,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct KvJson<'a> {
    key: &'a str,
    value: &'a str,
    mod_revision: u64,
    create_revision: u64,
    version: u64,
}

fn kv_json(e: &KvEntry) -> KvJson<'_> {
    KvJson {
        key: &e.key,
        value: &e.value,
        mod_revision: e.mod_revision,
        create_revision: e.create_revision,
        version: e.version,
    }
}

/// Entries per `kv ls` page flockctl asks for (the server may send fewer).
const KV_LIST_PAGE: u32 = 1000;

/// Runs one `flockctl kv` command; returns the exit code.
pub async fn run(api: &mut ApiClient<Channel>, cmd: KvCmd) -> anyhow::Result<i32> {
    match cmd {
        KvCmd::Put { key, value } => {
            let r = api
                .kv_put(KvPutRequest { key, value })
                .await
                .map_err(status_err)?
                .into_inner();
            if let Some(e) = r.entry {
                println!("revision {}", e.mod_revision);
            }
        }
        KvCmd::Get { key, stale, json } => {
            let r = api
                .kv_get(KvGetRequest {
                    key: key.clone(),
                    stale,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match r.entry {
                Some(e) if json => print_json(&kv_json(&e))?,
                Some(e) => println!("{}", e.value),
                None => {
                    if json {
                        println!("null");
                    } else {
                        eprintln!("flockctl: key {} does not exist", shown(&key));
                    }
                    return Ok(EXIT_NOT_FOUND);
                }
            }
        }
        KvCmd::Cas {
            key,
            expect,
            absent: _,
            value,
            json,
        } => {
            let r = api
                .kv_cas(KvCasRequest {
                    key: key.clone(),
                    expect: expect.clone(),
                    value,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                #[derive(Serialize)]
                struct CasJson<'a> {
                    succeeded: bool,
                    entry: Option<KvJson<'a>>,
                }
                print_json(&CasJson {
                    succeeded: r.succeeded,
                    entry: r.entry.as_ref().map(kv_json),
                })?;
            } else if r.succeeded {
                println!(
                    "revision {}",
                    r.entry.map(|e| e.mod_revision).unwrap_or_default()
                );
            } else {
                let now = match &r.entry {
                    Some(e) => format!("holds {}", shown(&e.value)),
                    None => "does not exist".into(),
                };
                let wanted = match &expect {
                    Some(v) => shown(v),
                    None => "no key".into(),
                };
                eprintln!(
                    "flockctl: not changed: {} {now}, expected {wanted}",
                    shown(&key)
                );
            }
            if !r.succeeded {
                return Ok(EXIT_CAS_FAILED);
            }
        }
        KvCmd::Rm { key } => {
            let r = api
                .kv_delete(KvDeleteRequest { key: key.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if r.existed {
                println!("deleted {key} at revision {}", r.revision);
            } else {
                println!("{key} did not exist");
            }
        }
        KvCmd::Ls {
            prefix,
            stale,
            json,
        } => {
            let prefix = prefix.unwrap_or_default();
            // Page by page (each page a read of its own), until the server says there is no more.
            let mut entries: Vec<KvEntry> = Vec::new();
            loop {
                let start_after = entries.last().map(|e| e.key.clone()).unwrap_or_default();
                let r = api
                    .kv_list(KvListRequest {
                        prefix: prefix.clone(),
                        stale,
                        limit: KV_LIST_PAGE,
                        start_after,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let progressed = !r.entries.is_empty();
                entries.extend(r.entries);
                if !r.more || !progressed {
                    break;
                }
            }
            if json {
                print_json(&entries.iter().map(kv_json).collect::<Vec<_>>())?;
            } else {
                let mut rows = vec![["KEY".to_string(), "VALUE".into(), "REVISION".into()]];
                rows.extend(
                    entries
                        .iter()
                        .map(|e| [cell(&e.key), cell(&e.value), e.mod_revision.to_string()]),
                );
                print!("{}", table(&rows));
            }
        }
    }
    Ok(0)
}
