//! Examples in README.md that another tool must accept: the libvirt domain
//! with a vhost-user disk, validated by libvirt's own schema
//! (virt-xml-validate, package libvirt-clients), and consistent with the
//! systemd units and instance config in configs/.

use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// Every ```xml block of the README.
fn xml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```xml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// `virt-xml-validate FILE domain`: (valid, output).
fn validate(dir: &std::path::Path, name: &str, xml: &str) -> (bool, String) {
    let file = dir.join(name);
    std::fs::write(&file, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (package libvirt-clients): run integration/install-deps.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The value of attribute `attr` on the first line holding `element`.
fn attribute(xml: &str, element: &str, attr: &str) -> String {
    let line = xml.lines().find(|l| l.contains(element)).unwrap();
    let start = line.find(&format!("{attr}='")).unwrap() + attr.len() + 2;
    line[start..].split('\'').next().unwrap().to_string()
}

#[test]
fn the_readme_libvirt_domain_validates_and_matches_the_units() {
    let blocks = xml_blocks(&readme());
    let domain = blocks
        .iter()
        .find(|b| b.contains("<disk type='vhostuser' device='disk'>"))
        .expect("a vhost-user disk example in README.md");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = validate(dir.path(), "vm1.xml", domain);
    assert!(ok, "{out}");
    // Control: the schema does check the disk.
    let broken = domain.replace("type='vhostuser'", "type='vhostusr'");
    let (ok, out) = validate(dir.path(), "broken.xml", &broken);
    assert!(!ok, "a misspelt disk type validated: {out}");

    let configs = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let socket_unit = std::fs::read_to_string(format!("{configs}/cryptblk@.socket")).unwrap();
    let listen = socket_unit
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .unwrap();
    let name = domain
        .split("<name>")
        .nth(1)
        .and_then(|r| r.split("</name>").next())
        .unwrap();
    assert_eq!(
        attribute(domain, "<source type='unix'", "path"),
        listen.replace("%i", name),
        "the domain's socket is not cryptblk@{name}.socket's"
    );
    let instance: toml::Value = toml::from_str(
        &std::fs::read_to_string(format!("{configs}/cryptblk-instance.toml")).unwrap(),
    )
    .unwrap();
    let daemon_queues = instance["queues"].as_integer().unwrap();
    let vmm_queues: i64 = attribute(domain, "<driver name='qemu'", "queues")
        .parse()
        .unwrap();
    assert!(vmm_queues <= daemon_queues);
    assert!(
        domain.contains("<access mode='shared'/>"),
        "guest memory must be shared"
    );
}

/// The long option names in the first column of README's `cryptblk serve`
/// options table.
fn readme_serve_options() -> std::collections::BTreeSet<String> {
    let text = readme();
    let start = text
        .find("### `cryptblk serve` options")
        .expect("the options section");
    let section = &text[start..];
    let end = section[4..].find("\n### ").map_or(section.len(), |e| e + 4);
    let mut names = std::collections::BTreeSet::new();
    for row in section[..end].lines().filter(|l| l.starts_with("| `--")) {
        let first = row.split(" | ").next().unwrap();
        for piece in first.split('`').skip(1).step_by(2) {
            let name = piece.trim_start_matches("--");
            let name = name.split([' ', '=']).next().unwrap();
            if piece.starts_with("--") {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn the_readme_options_table_matches_the_serve_flags() {
    use clap::Args;
    let command = cryptblk::config::ServeArgs::augment_args(clap::Command::new("serve"));
    let mut flags = std::collections::BTreeSet::new();
    for arg in command.get_arguments() {
        if let Some(long) = arg.get_long() {
            flags.insert(long.to_string());
        }
        for alias in arg.get_visible_aliases().into_iter().flatten() {
            flags.insert(alias.to_string());
        }
    }
    let documented = readme_serve_options();
    // Negative control: the parser found the table at all.
    assert!(documented.len() > 30, "only {documented:?} found in README");
    let missing: Vec<_> = flags.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&flags).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's serve options table is out of date: undocumented flags {missing:?}, documented flags that do not exist {stale:?}"
    );
}
