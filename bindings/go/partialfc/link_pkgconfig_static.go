//go:build !partialfc_repo && partialfc_static

package partialfc

// With -tags partialfc_static: the installed libpartialfc.a is linked into the program, with the
// system libraries pkg-config --static lists; the program then runs without libpartialfc.so. The
// archive comes first, so it defines every pfc_ symbol, and --as-needed drops the -lpartialfc that
// pkg-config also lists, which would otherwise still record the shared library as needed.

// #cgo pkg-config: --static partialfc
// #cgo LDFLAGS: -l:libpartialfc.a -Wl,--as-needed
import "C"
