//! Replays every fuzz corpus and regression input (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the same checks the fuzz targets run, without the
//! fuzzer: what AFL++ found once stays fixed, and the properties hold for the seeds.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

#[test]
fn every_corpus_input_keeps_its_target_s_properties() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (target, check) in checks::TARGETS {
        let mut inputs = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a directory entry").path();
                let data = std::fs::read(&path).expect("a readable input");
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(
                    outcome.is_ok(),
                    "{target}: {} breaks a property",
                    path.display()
                );
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no corpus for fuzz target {target}");
        replayed += inputs;
    }
    println!("{replayed} inputs replayed");
}
