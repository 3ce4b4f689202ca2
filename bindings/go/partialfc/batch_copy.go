//go:build !go1.21 || partialfc_copy

package partialfc

// #include <stdlib.h>
// #include "partialfc.h"
// pfc_status pfcgo_step_n(pfc_head *head, int train, const pfc_batch *b, uint32_t n, pfc_step_stats *stats);
import "C"

import "unsafe"

// stepBatches copies each shard's embeddings and labels into C memory, builds the pfc_batch array
// there, and copies the gradients back after a successful step: Go before 1.21 has no
// runtime.Pinner, and C memory may not hold Go pointers. (-tags partialfc_copy selects this path on
// newer Go too.) One shard takes the zero-copy path in partialfc.go instead.
func stepBatches(head *C.pfc_head, train C.int, dtype C.int32_t, bufs []shardBuf, st *C.pfc_step_stats) C.pfc_status {
	if len(bufs) == 0 {
		return C.pfcgo_step_n(head, train, nil, 0, st)
	}
	p, batches := newCBatches(len(bufs))
	defer C.free(unsafe.Pointer(p))
	grads := make([]unsafe.Pointer, len(bufs))
	for i, b := range bufs {
		emb := cBytes(b.emb, b.embBytes)
		labels := cBytes(b.labels, b.rows*8)
		var grad unsafe.Pointer
		if b.grad != nil {
			grad = C.malloc(C.size_t(b.gradBytes))
		}
		grads[i] = grad
		defer C.free(emb)
		defer C.free(labels)
		defer C.free(grad)
		batches[i].embeddings = emb
		batches[i].labels = (*C.int64_t)(labels)
		batches[i].grad_embeddings = grad
		batches[i].batch_size = C.uint64_t(b.rows)
		batches[i].dtype = dtype
		batches[i].memory = C.PFC_MEMORY_HOST
	}
	status := C.pfcgo_step_n(head, train, p, C.uint32_t(len(bufs)), st)
	if status == C.PFC_OK {
		for i, b := range bufs {
			if grads[i] != nil {
				copy(unsafe.Slice((*byte)(b.grad), b.gradBytes), unsafe.Slice((*byte)(grads[i]), b.gradBytes))
			}
		}
	}
	return status
}
