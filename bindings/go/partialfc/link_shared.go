//go:build !partialfc_static

package partialfc

// Links libpartialfc.so from the repository's target/release (cargo build --release --lib), with an
// rpath so that programs find it without LD_LIBRARY_PATH. CGO_LDFLAGS="-L<dir> -Wl,-rpath,<dir>"
// points at another build. Build with -tags partialfc_static to link libpartialfc.a instead.

// #cgo LDFLAGS: -L${SRCDIR}/../../../target/release -lpartialfc -Wl,-rpath,${SRCDIR}/../../../target/release
import "C"
