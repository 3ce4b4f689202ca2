//! include/partialfc.h is generated from src/ffi by cbindgen and committed; this test regenerates
//! it and fails when the committed copy is stale (PFC_BLESS=1 rewrites it).

use std::path::PathBuf;

#[test]
fn header_is_fresh() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/partialfc.h");
    if std::env::var_os("PFC_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/partialfc.h is stale: run `PFC_BLESS=1 cargo test --test header` and commit it"
    );
}
