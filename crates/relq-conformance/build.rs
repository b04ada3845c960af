//! Lists the conformance tests: every `pub async fn NAME(b: Broker)` in `src/tests/*.rs`, so
//! `conformance_suite!` runs a new test on every backend without a second edit.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("src/tests");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("src/tests")
        .map(|e| e.expect("src/tests entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for file in &files {
        println!("cargo::rerun-if-changed={}", file.display());
        let text = std::fs::read_to_string(file).expect("a test file");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("pub async fn ") else {
                continue;
            };
            let (name, args) = rest.split_once('(').expect("a test's parameters");
            assert!(
                args.starts_with("b: Broker)"),
                "{}: a conformance test takes `b: Broker` alone: {line}",
                file.display()
            );
            names.push(name.to_owned());
        }
    }
    assert!(!names.is_empty(), "no conformance tests found in src/tests");
    let mut out = String::from(
        "/// Internal to `conformance_suite!`: the tests, as found in `src/tests` by `build.rs`.\n\
         #[doc(hidden)]\n#[macro_export]\nmacro_rules! __conformance_list {\n    \
         ($($args:tt)*) => {\n        $crate::__conformance_each!($($args)*;\n",
    );
    for name in &names {
        writeln!(out, "            {name},").unwrap();
    }
    out.push_str("        );\n    };\n}\n");
    let path = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("conformance_list.rs");
    std::fs::write(path, out).expect("write the test list");
}
