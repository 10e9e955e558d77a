//! Shell completions and man pages, generated from the clap definitions in [`crate::cli`] so
//! they can never offer a flag the parser does not take, or miss one it does.

use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// The completion script for `shell`, written to `out` whole or not at all: clap_complete
/// panics on a write error, and `narpost completions bash | head` must not.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) -> io::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "narpost", &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// narpost(1): the global options and the list of subcommands.
pub fn write_man_page(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)?;
    out.flush()
}

/// narpost.1 and one page per subcommand (narpost-push.1, ...) in `dir`, the way git splits
/// its manual, so each subcommand's options have a page of their own.
pub fn write_man_pages(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}
