//go:build partialfc_static

package partialfc

// With -tags partialfc_static: links libpartialfc.a (cargo build --release --lib) into the program,
// plus the system libraries the Rust standard library needs. The program then runs without
// libpartialfc.so.

// #cgo LDFLAGS: -L${SRCDIR}/../../../target/release -l:libpartialfc.a -lm -ldl -lpthread -lrt -lutil
import "C"
