//go:build partialfc_repo && !partialfc_static

package partialfc

// With -tags partialfc_repo: this checkout's include/ and target/release (cargo build --release
// --lib), with an rpath so that programs find libpartialfc.so without LD_LIBRARY_PATH: for work on
// the repository itself, without installing. Only meaningful inside the repository.

// #cgo CFLAGS: -I${SRCDIR}/../../../include
// #cgo LDFLAGS: -L${SRCDIR}/../../../target/release -lpartialfc -Wl,-rpath,${SRCDIR}/../../../target/release
import "C"
