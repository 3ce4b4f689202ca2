package partialfc

// #include <stdlib.h>
// #include "partialfc.h"
import "C"

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"unsafe"
)

// SearchChunkRows is how many queries one C search call handles when a search takes a context:
// the context is checked between chunks, so a cancelled search stops within one chunk's time.
const SearchChunkRows = 1024

// Index is a search-only index over trained centers (pfc_index): an exported file in any Format
// (also numpy, safetensors or FAISS IndexFlatIP files of f32/f16 [C, d] centers) or a checkpoint
// directory. It holds no optimizer state and no training configuration, so a serving process opens
// it instead of building a Head. Searches may run from any number of goroutines at once; Close
// waits for them. A finalizer closes an index the program forgets.
type Index struct {
	mu      sync.RWMutex // searches hold it shared, Close exclusively
	ptr     *C.pfc_index
	classes uint64
	dim     int
}

// OpenIndex opens the centers at path (pfc_index_open). A damaged or foreign file gives
// StatusCorrupt, a missing one StatusIO.
func OpenIndex(path string) (*Index, error) {
	const op = "pfc_index_open"
	if strings.IndexByte(path, 0) >= 0 {
		return nil, invalid(op, "path %q contains a NUL byte", path)
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	out := (**C.pfc_index)(C.malloc(C.size_t(unsafe.Sizeof(uintptr(0)))))
	defer C.free(unsafe.Pointer(out))
	*out = nil
	if err := call(op, func() C.pfc_status { return C.pfc_index_open(cs, out) }); err != nil {
		return nil, err
	}
	ix := &Index{ptr: *out}
	var classes C.uint64_t
	var dim C.uint32_t
	if err := call("pfc_index_info", func() C.pfc_status { return C.pfc_index_info(ix.ptr, &classes, &dim) }); err != nil {
		C.pfc_index_close(ix.ptr)
		return nil, err
	}
	ix.classes, ix.dim = uint64(classes), int(dim)
	runtime.SetFinalizer(ix, func(ix *Index) { _ = ix.Close() })
	return ix, nil
}

// NumClasses is the number of classes (center rows); class ids are row numbers.
func (ix *Index) NumClasses() uint64 { return ix.classes }

// EmbeddingDim is the dimension of the centers and of every query.
func (ix *Index) EmbeddingDim() int { return ix.dim }

// Close frees the index. It is idempotent; later searches return ErrClosed.
func (ix *Index) Close() error {
	if ix == nil {
		return nil
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.ptr != nil {
		C.pfc_index_close(ix.ptr)
		ix.ptr = nil
		runtime.SetFinalizer(ix, nil)
	}
	return nil
}

// Search returns the k classes with the highest cosine to each query (len(queries)/EmbeddingDim
// rows), best first, ties to the smaller class id: the results pfc_search gives on a head holding
// these centers. Queries are searched SearchChunkRows at a time, ctx checked before each chunk; a
// cancelled search returns ctx's error and no results.
func (ix *Index) Search(ctx context.Context, queries []float32, k int) (SearchResult, error) {
	const op = "pfc_index_search"
	if ix == nil {
		return SearchResult{}, closedError(op)
	}
	ix.mu.RLock()
	defer func() {
		ix.mu.RUnlock()
		runtime.KeepAlive(ix)
	}()
	if ix.ptr == nil {
		return SearchResult{}, closedError(op)
	}
	p := ix.ptr
	return searchChunked(ctx, op, queries, ix.dim, k, ix.classes, func(q *C.float, n C.uint64_t, k C.uint32_t, ids *C.int64_t, scores *C.float) C.pfc_status {
		return C.pfc_index_search(p, q, n, k, ids, scores)
	})
}

// searchFn is one C search call over n queries.
type searchFn func(q *C.float, n C.uint64_t, k C.uint32_t, ids *C.int64_t, scores *C.float) C.pfc_status

// searchChunked checks the arguments, then runs search over the queries SearchChunkRows at a time
// into one result, checking ctx before each chunk. classes bounds k (the classes searched).
func searchChunked(ctx context.Context, op string, queries []float32, dim, k int, classes uint64, search searchFn) (SearchResult, error) {
	if dim == 0 || len(queries)%dim != 0 {
		return SearchResult{}, invalid(op, "%d query values are not whole rows of dimension %d", len(queries), dim)
	}
	n := len(queries) / dim
	if k < 0 || (n > 0 && uint64(k) > classes) {
		return SearchResult{}, invalid(op, "k = %d is outside [1, %d] (the classes searched)", k, classes)
	}
	hits := n * k
	// Without queries or k the library refuses before writing; it still gets valid pointers.
	ids := make([]int64, hits+1)
	scores := make([]float32, hits+1)
	if n == 0 || k == 0 {
		var q *C.float
		if n > 0 {
			q = (*C.float)(&queries[0])
		}
		err := call(op, func() C.pfc_status {
			return search(q, C.uint64_t(n), C.uint32_t(k), (*C.int64_t)(&ids[0]), (*C.float)(&scores[0]))
		})
		return SearchResult{}, err
	}
	for first := 0; first < n; first += SearchChunkRows {
		if err := ctx.Err(); err != nil {
			return SearchResult{}, err
		}
		rows := n - first
		if rows > SearchChunkRows {
			rows = SearchChunkRows
		}
		err := call(op, func() C.pfc_status {
			return search((*C.float)(&queries[first*dim]), C.uint64_t(rows), C.uint32_t(k),
				(*C.int64_t)(&ids[first*k]), (*C.float)(&scores[first*k]))
		})
		if err != nil {
			return SearchResult{}, err
		}
	}
	return SearchResult{N: n, K: k, IDs: ids[:hits], Scores: scores[:hits]}, nil
}
