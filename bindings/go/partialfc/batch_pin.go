//go:build go1.21 && !partialfc_copy

package partialfc

// #include <stdlib.h>
// #include "partialfc.h"
// pfc_status pfcgo_step_n(pfc_head *head, int train, const pfc_batch *b, uint32_t n, pfc_step_stats *stats);
import "C"

import (
	"runtime"
	"unsafe"
)

// stepBatches builds the pfc_batch array in C memory pointing at the caller's slices, pinned for the
// call (runtime.Pinner, Go ≥ 1.21: C memory may then hold those Go pointers), so nothing is copied.
// The pins and the array are released when the call returns.
func stepBatches(head *C.pfc_head, train C.int, dtype C.int32_t, bufs []shardBuf, st *C.pfc_step_stats) C.pfc_status {
	if len(bufs) == 0 {
		return C.pfcgo_step_n(head, train, nil, 0, st)
	}
	p, batches := newCBatches(len(bufs))
	defer C.free(unsafe.Pointer(p))
	var pinner runtime.Pinner
	defer pinner.Unpin()
	for i, b := range bufs {
		for _, ptr := range []unsafe.Pointer{b.emb, b.labels, b.grad} {
			if ptr != nil {
				pinner.Pin(ptr)
			}
		}
		batches[i].embeddings = b.emb
		batches[i].labels = (*C.int64_t)(b.labels)
		batches[i].grad_embeddings = b.grad
		batches[i].batch_size = C.uint64_t(b.rows)
		batches[i].dtype = dtype
		batches[i].memory = C.PFC_MEMORY_HOST
	}
	return C.pfcgo_step_n(head, train, p, C.uint32_t(len(bufs)), st)
}
