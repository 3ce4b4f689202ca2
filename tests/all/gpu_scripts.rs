//! The GPU check's scripts on a machine where they cannot be decisive: each stops at once, with a
//! non-zero status and a message that says what is missing, instead of reporting a pass.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn gpu_stage_without_the_reference_fails_before_building() {
    let empty = std::env::temp_dir().join(format!("pfc-no-insightface-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new("bash").arg("scripts/gpu-stage.sh").arg(&empty).current_dir(repo()).output().unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("partial_fc_v2.py is missing"), "{stderr}");
    // Refused before cargo ran: nothing was built or staged.
    assert!(!stderr.contains("Compiling") && !stderr.contains("Finished"), "{stderr}");
}

#[test]
fn gpu_check_refuses_an_incomplete_stage_or_a_machine_without_a_gpu() {
    let results = std::env::temp_dir().join(format!("pfc-gpu-check-{}", std::process::id()));
    let out = Command::new("bash").arg("scripts/gpu-check.sh").env("OUT", &results).current_dir(repo()).output().unwrap();
    let log = std::fs::read_to_string(results.join("gpu-check.log")).unwrap_or_default();
    std::fs::remove_dir_all(&results).ok();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), log);
    assert_eq!(out.status.code(), Some(2), "{text}");
    // Whichever comes first on this machine: no stage (CI) or no GPU (a staged development tree).
    assert!(
        text.contains("the stage is incomplete") && text.contains("scripts/gpu-stage.sh") || text.contains("no usable NVIDIA GPU"),
        "{text}"
    );
    assert!(!text.contains("failures: 0"), "{text}");
}
