//! Man pages of a command line, rendered from its clap definition: one page
//! for the command and one for every visible subcommand (`lbctl-vip-add(1)`
//! and so on, the names the command's own page lists under SUBCOMMANDS).

use std::{
    io,
    path::{Path, PathBuf},
};

/// Writes `cmd`'s page and its subcommands' pages, in man `section`, to
/// `dir` (`NAME.SECTION`, uncompressed); returns the files written.
pub fn write_all(cmd: clap::Command, section: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn write(
        cmd: clap::Command,
        section: &str,
        dir: &Path,
        out: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), section, dir, out)?;
        }
        let page = clap_mangen::Man::new(cmd).section(section);
        out.push(page.generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    // Built, subcommands get their display names (`lbctl-vip-add`); the
    // help subcommand has no page of its own (every page has the options).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    write(cmd, section, dir, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_subcommand_gets_a_page_named_as_its_parent_lists_it() {
        let cmd = clap::Command::new("tool")
            .about("A tool")
            .subcommand(
                clap::Command::new("vip")
                    .about("VIPs")
                    .subcommand(clap::Command::new("add").about("Add one")),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = std::env::temp_dir().join(format!("lb-man-pages-{}", std::process::id()));
        let files = write_all(cmd, "8", &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool-vip-add.8", "tool-vip.8", "tool.8"]);
        let top = std::fs::read_to_string(dir.join("tool.8")).unwrap();
        assert!(top.contains("tool\\-vip(8)"), "{top}");
        let add = std::fs::read_to_string(dir.join("tool-vip-add.8")).unwrap();
        assert!(add.contains(".TH tool-vip-add 8"), "{add}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
