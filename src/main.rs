//! `shardplan`: the command-line edge. All IO and rendering live here; the
//! compiler crate returns values and diagnostics.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`shardplan inspect … | head`), instead of failing
    // to print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at start-up,
    // before any other thread exists, has no other effect on the program.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A device thread that panics is reported once, as that device's error,
    // by the runtime; the default message would repeat it as a backtrace hint.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !std::thread::current().name().is_some_and(|n| n.starts_with("device ")) {
            default_hook(info);
        }
    }));
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The checker recurses over expressions and layer nesting, both bounded;
    // a large stack keeps the worst bounded case far from the limit.
    let worker = std::thread::Builder::new().name("shardplan".into()).stack_size(256 << 20).spawn(move || cli::run(args));
    match worker.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        _ => {
            eprintln!("error: shardplan stopped unexpectedly; please report this with the plan file");
            ExitCode::from(1)
        }
    }
}
