//! `pfc_nccl_unique_id`: an id where NCCL is installed, PFC_ERR_UNAVAILABLE naming both library
//! names where it is not, never a crash; NULL is refused.

use crate::common::*;
use partialfc::ffi::*;

#[test]
fn unique_id_or_a_clear_unavailable() {
    assert_eq!(pfc_nccl_unique_id(std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    assert!(last_error().contains("out"));
    let mut id = [0xAAu8; PFC_NCCL_ID_BYTES];
    match pfc_nccl_unique_id(id.as_mut_ptr()) {
        PFC_OK => assert!(id.iter().any(|&b| b != 0xAA), "id not written"),
        PFC_ERR_UNAVAILABLE => {
            let msg = last_error();
            assert!(msg.contains("libnccl.so") && msg.contains("libnccl.so.2"), "{msg}");
            assert!(id.iter().all(|&b| b == 0xAA), "output written on failure");
        }
        s => panic!("status {s}: {}", last_error()),
    }
}
