//go:build !partialfc_repo && !partialfc_static

package partialfc

// The default: the header and libpartialfc.so of an installed partialfc (cargo cinstall), found
// through pkg-config, so the module builds from the module cache. For a prefix pkg-config does not
// search, set PKG_CONFIG_PATH=<libdir>/pkgconfig; for one the dynamic loader does not search, add
// CGO_LDFLAGS="-Wl,-rpath,<libdir>" (or LD_LIBRARY_PATH at run time).

// #cgo pkg-config: partialfc
import "C"
