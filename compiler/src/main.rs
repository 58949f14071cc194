//! The `iresnetc` command line. Errors are printed on one line and exit with
//! code 2; nothing is written unless the whole command succeeded.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// Longest error message printed: quoted user data must never flood the terminal.
const MAX_MESSAGE: usize = 600;

fn main() -> ExitCode {
    // Last line of defence: a panic is a bug, but it still ends as one line, exit code 2,
    // and no temporary output left behind.
    std::panic::set_hook(Box::new(|info| {
        iresnetc::output::rollback();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if what.contains("failed printing to stdout") {
            // The reader of a pipe went away (`iresnetc ... | head`): not a bug.
            eprintln!("error: standard output was closed before the command finished; nothing was written");
        } else {
            eprintln!(
                "error: internal error ({}{at}); please report it",
                one_line(&what)
            );
        }
        std::process::exit(2);
    }));
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    let result = cli::run(args).and_then(|()| Ok(iresnetc::output::commit()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            iresnetc::output::rollback();
            eprintln!("error: {}", message(&e));
            ExitCode::from(2)
        }
    }
}

/// clap's help and version go to stdout with exit 0; a usage error becomes one line (its
/// first, without clap's multi-line usage block) plus a short hint, exit code 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = write!(std::io::stdout(), "{e}");
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!("error: a subcommand or argument is missing; see `iresnetc --help`");
        return ExitCode::from(2);
    }
    // clap's message is the lines before its usage block (a missing argument is named on
    // the line after "the following required arguments were not provided:").
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines.join(" ");
    let first = joined.strip_prefix("error: ").unwrap_or(&joined);
    let first = if first.is_empty() {
        "invalid command line"
    } else {
        first
    };
    eprintln!(
        "error: {}; see `iresnetc --help`",
        iresnetc_runtime::fsread::clip(first, 200)
    );
    ExitCode::from(2)
}

/// The error and its causes on one line, each cause once: library errors already name their
/// cause in their own message, so a cause whose text is already there is not repeated.
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = one_line(&cause.to_string());
        let short = text
            .find(" (os error")
            .map_or(text.as_str(), |i| &text[..i])
            .to_string();
        if msg.contains(&short) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    iresnetc_runtime::fsread::clip(&cut_long_words(&msg), MAX_MESSAGE)
}

/// Quoted user data (a TOML value, a JSON string, a tensor name) can be any length: every
/// run of more than 200 non-blank characters is cut to its first 80. Paths stay whole.
fn cut_long_words(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(4 * MAX_MESSAGE));
    for (i, word) in msg.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.chars().count() > 200 {
            out.push_str(&iresnetc_runtime::fsread::clip(word, 80));
        } else {
            out.push_str(word);
        }
        if out.len() > 4 * MAX_MESSAGE {
            break;
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
