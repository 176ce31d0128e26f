//! flockctl: the operator CLI. See `flock_node::ctl`.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Die quietly on a closed pipe (`flockctl status | head`), as other Unix tools do.
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = flock_node::ctl::Cli::parse();
    match flock_node::ctl::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("flockctl: {e:#}");
            std::process::exit(flock_node::ctl::exit_code(&e));
        }
    }
}
