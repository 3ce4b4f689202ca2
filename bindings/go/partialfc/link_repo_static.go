//go:build partialfc_repo && partialfc_static

package partialfc

// With -tags partialfc_repo,partialfc_static: this checkout's target/release/libpartialfc.a linked
// into the program, plus the system libraries the Rust standard library needs.

// #cgo CFLAGS: -I${SRCDIR}/../../../include
// #cgo LDFLAGS: -L${SRCDIR}/../../../target/release -l:libpartialfc.a -lm -ldl -lpthread -lrt -lutil
import "C"
