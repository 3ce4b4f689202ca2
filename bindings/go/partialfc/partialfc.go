// Package partialfc is a cgo binding of libpartialfc, the PartialFC classification head of
// large-scale face-recognition training (include/partialfc.h).
//
//	cfg := partialfc.DefaultConfig() // the library's defaults: s = 64, ArcFace m2 = 0.5, SGD 0.1/0.9/5e-4
//	cfg.NumClasses, cfg.EmbeddingDim = 100000, 512
//	head, err := partialfc.New(cfg)
//	if err != nil { ... }
//	defer head.Close()
//	stats, err := head.TrainStep(partialfc.Batch{Embeddings: emb, Labels: labels, Grad: grad})
//
// Errors are *Error values carrying the C status, the failing C function and the library's message;
// errors.Is(err, partialfc.StatusInvalidArgument) tests the status, errors.Is(err, ErrClosed) a call
// on a closed head. The message is read on the OS thread that made the failing call (the library
// keeps the last error per thread). On any error the head is unchanged.
//
// Memory: Go slices are handed to C only for the duration of a call; the library keeps no pointer
// afterwards. Configurations and the per-shard pfc_batch arrays are built in C memory, so no Go
// memory handed to C holds a Go pointer (the cgo rules). A nil or empty slice is passed as NULL and
// the library reports it (StatusNullArgument) where a buffer is required.
//
// A Head may be used from several goroutines: the library serializes calls on one head. Close is
// idempotent, waits for calls in flight, and runs from a finalizer if the program forgets it.
//
// Processes: this binding drives single-process heads (process_count = 1: every shard in this
// process). A job spread over several processes needs the C ABI's allgather callback (SPEC §2a),
// which the C and C++ interfaces provide (see examples/mpi/); Config has no process fields yet.
package partialfc

/*
#include <stdlib.h>
#include <string.h>
#include "partialfc.h"

// One shard's step with the batch built on the C stack: the Go pointers are plain call arguments,
// never stored in memory that outlives the call.
static pfc_status pfcgo_step1(pfc_head *head, int train, const void *emb, const int64_t *labels, void *grad,
                              uint64_t rows, int32_t dtype, pfc_step_stats *stats) {
	pfc_batch b;
	memset(&b, 0, sizeof b);
	b.embeddings = emb;
	b.labels = labels;
	b.grad_embeddings = grad;
	b.batch_size = rows;
	b.dtype = dtype;
	b.memory = PFC_MEMORY_HOST;
	b.stream = NULL;
	return train ? pfc_train_step(head, &b, 1, stats) : pfc_evaluate(head, &b, 1, stats);
}

// Several shards: the batch array is in C memory (batch_pin.go, batch_copy.go).
pfc_status pfcgo_step_n(pfc_head *head, int train, const pfc_batch *b, uint32_t n, pfc_step_stats *stats) {
	return train ? pfc_train_step(head, b, n, stats) : pfc_evaluate(head, b, n, stats);
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"
)

// Status is a pfc_status code. A Status is also an error, so errors.Is(err, StatusCorrupt) works.
type Status int32

const (
	StatusOK              Status = C.PFC_OK
	StatusNullArgument    Status = C.PFC_ERR_NULL_ARGUMENT
	StatusInvalidArgument Status = C.PFC_ERR_INVALID_ARGUMENT
	StatusOutOfMemory     Status = C.PFC_ERR_OUT_OF_MEMORY
	StatusUnavailable     Status = C.PFC_ERR_UNAVAILABLE
	StatusDevice          Status = C.PFC_ERR_DEVICE
	StatusCommunication   Status = C.PFC_ERR_COMMUNICATION
	StatusIO              Status = C.PFC_ERR_IO
	StatusCorrupt         Status = C.PFC_ERR_CORRUPT
	StatusIncompatible    Status = C.PFC_ERR_INCOMPATIBLE
	StatusPanic           Status = C.PFC_ERR_PANIC
	StatusNonFinite       Status = C.PFC_ERR_NON_FINITE
)

var statusNames = map[Status]string{
	StatusOK:              "PFC_OK",
	StatusNullArgument:    "PFC_ERR_NULL_ARGUMENT",
	StatusInvalidArgument: "PFC_ERR_INVALID_ARGUMENT",
	StatusOutOfMemory:     "PFC_ERR_OUT_OF_MEMORY",
	StatusUnavailable:     "PFC_ERR_UNAVAILABLE",
	StatusDevice:          "PFC_ERR_DEVICE",
	StatusCommunication:   "PFC_ERR_COMMUNICATION",
	StatusIO:              "PFC_ERR_IO",
	StatusCorrupt:         "PFC_ERR_CORRUPT",
	StatusIncompatible:    "PFC_ERR_INCOMPATIBLE",
	StatusPanic:           "PFC_ERR_PANIC",
	StatusNonFinite:       "PFC_ERR_NON_FINITE",
}

func (s Status) String() string {
	if name, ok := statusNames[s]; ok {
		return name
	}
	return fmt.Sprintf("pfc_status(%d)", int32(s))
}

func (s Status) Error() string { return "partialfc: " + s.String() }

// Error is a failed call: the C function (Op), its status and the library's message. Sizes the Go
// wrapper rejects before calling C (a slice whose length does not match the embedding dimension)
// give StatusInvalidArgument with the wrapper's message.
type Error struct {
	Op      string
	Status  Status
	Message string
}

func (e *Error) Error() string {
	return "partialfc: " + e.Op + ": " + e.Status.String() + ": " + e.Message
}

// Is reports whether target is this error's Status.
func (e *Error) Is(target error) bool {
	s, ok := target.(Status)
	return ok && s == e.Status
}

// ErrClosed is returned (wrapped) by every call on a closed head.
var ErrClosed = errors.New("partialfc: the head is closed")

func closedError(op string) error { return fmt.Errorf("partialfc: %s: %w", op, ErrClosed) }

func invalid(op, format string, args ...interface{}) error {
	return &Error{Op: op, Status: StatusInvalidArgument, Message: fmt.Sprintf(format, args...)}
}

// lastError is the calling thread's last message; the caller holds the OS thread.
func lastError() string {
	n := C.pfc_last_error(nil, 0)
	buf := make([]byte, int(n)+1)
	C.pfc_last_error((*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)))
	return string(buf[:n])
}

// call runs f (one C call) and, when it fails, reads the message on the same OS thread.
func call(op string, f func() C.pfc_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if st := f(); st != C.PFC_OK {
		return &Error{Op: op, Status: Status(st), Message: lastError()}
	}
	return nil
}

// Version is the library's version, e.g. "0.1.0".
func Version() string { return C.GoString(C.pfc_version()) }

// NCCLUniqueID creates an NCCL unique id (NCCLIDBytes bytes) for a multi-process run: create it in
// one process, share it, set it as Config.NCCLID everywhere. StatusUnavailable without NCCL.
func NCCLUniqueID() ([]byte, error) {
	id := make([]byte, NCCLIDBytes)
	err := call("pfc_nccl_unique_id", func() C.pfc_status { return C.pfc_nccl_unique_id((*C.uint8_t)(&id[0])) })
	if err != nil {
		return nil, err
	}
	return id, nil
}

// Enumerations (the C values).
type (
	Backend    int32
	DType      int32
	Optimizer  int32
	MarginGrad int32
	MarginKind int32
	Format     int32
)

const (
	BackendCPU  Backend = C.PFC_BACKEND_CPU
	BackendCUDA Backend = C.PFC_BACKEND_CUDA

	DTypeF32  DType = C.PFC_DTYPE_F32
	DTypeF16  DType = C.PFC_DTYPE_F16
	DTypeBF16 DType = C.PFC_DTYPE_BF16

	OptimizerSGD   Optimizer = C.PFC_OPTIMIZER_SGD
	OptimizerAdamW Optimizer = C.PFC_OPTIMIZER_ADAMW

	MarginGradStraightThrough MarginGrad = C.PFC_MARGIN_GRAD_STRAIGHT_THROUGH
	MarginGradExact           MarginGrad = C.PFC_MARGIN_GRAD_EXACT

	MarginCombined   MarginKind = C.PFC_MARGIN_COMBINED
	MarginAdaFace    MarginKind = C.PFC_MARGIN_ADAFACE
	MarginCurricular MarginKind = C.PFC_MARGIN_CURRICULAR

	FormatSafetensors Format = C.PFC_FORMAT_SAFETENSORS
	FormatNPY         Format = C.PFC_FORMAT_NPY
	FormatFvecs       Format = C.PFC_FORMAT_FVECS
	// FormatFAISS is a FAISS IndexFlatIP file (faiss.read_index opens it), f32 only.
	FormatFAISS Format = C.PFC_FORMAT_FAISS

	// NCCLIDBytes is the size of an NCCL unique id (Config.NCCLID).
	NCCLIDBytes = C.PFC_NCCL_ID_BYTES
)

// Config mirrors pfc_config. Start from DefaultConfig, then set NumClasses, EmbeddingDim and
// whatever else differs: a zero Config is not valid (a zero Scale, for one, is refused).
type Config struct {
	NumClasses   uint64
	EmbeddingDim uint32
	// Fraction of each shard's classes used per step, in (0, 1].
	SampleRate float32
	// Logit scale s and the combined margin s·(cos(M1·θ + M2) − M3).
	Scale, M1, M2, M3 float32
	InterclassFilter  float32
	MarginGrad        MarginGrad
	ArcfaceFallback   bool
	// The adaptive margins (SPEC §1.6a): the kind, its m (0 = the kind's default), AdaFace's h and
	// running-statistics weight.
	MarginKind        MarginKind
	MarginM           float32
	AdaFaceH          float32
	AdaFaceTAlpha     float32
	Optimizer         Optimizer
	LR, Momentum      float32
	WeightDecay       float32
	Beta1, Beta2, Eps float32
	ComputeDType      DType
	// StorageDType stores centers and optimizer state in DTypeF32 or DTypeBF16 (stochastic
	// rounding: half the memory per class).
	StorageDType DType
	Seed         uint64
	InitStd      float32
	Backend      Backend
	// Shards this process drives: GPUs (CUDA) or threads of work (CPU).
	LocalShards uint32
	// CUDA ordinals, LocalShards entries; nil = 0..LocalShards-1.
	Devices []int32
	// Shards over all processes; 0 = LocalShards.
	WorldSize uint32
	FirstRank uint32
	// NCCLIDBytes bytes, needed when WorldSize > LocalShards.
	NCCLID []byte
}

// DefaultConfig is the library's defaults (pfc_config_init): s = 64, ArcFace m2 = 0.5, sample rate 1,
// SGD lr 0.1 momentum 0.9 weight decay 5e-4, AdamW betas 0.9/0.999 eps 1e-8, centers N(0, 0.01²),
// f32, CPU, one shard. NumClasses and EmbeddingDim are 0 and must be set.
func DefaultConfig() Config {
	c := (*C.pfc_config)(C.malloc(C.size_t(unsafe.Sizeof(C.pfc_config{}))))
	defer C.free(unsafe.Pointer(c))
	C.pfc_config_init(c)
	return Config{
		NumClasses:       uint64(c.num_classes),
		EmbeddingDim:     uint32(c.embedding_dim),
		SampleRate:       float32(c.sample_rate),
		Scale:            float32(c.scale),
		M1:               float32(c.m1),
		M2:               float32(c.m2),
		M3:               float32(c.m3),
		InterclassFilter: float32(c.interclass_filter),
		MarginGrad:       MarginGrad(c.margin_grad),
		ArcfaceFallback:  c.arcface_fallback != 0,
		MarginKind:       MarginKind(c.margin_kind),
		MarginM:          float32(c.margin_m),
		AdaFaceH:         float32(c.adaface_h),
		AdaFaceTAlpha:    float32(c.adaface_t_alpha),
		Optimizer:        Optimizer(c.optimizer),
		LR:               float32(c.lr),
		Momentum:         float32(c.momentum),
		WeightDecay:      float32(c.weight_decay),
		Beta1:            float32(c.beta1),
		Beta2:            float32(c.beta2),
		Eps:              float32(c.eps),
		ComputeDType:     DType(c.compute_dtype),
		StorageDType:     DType(c.storage_dtype),
		Seed:             uint64(c.seed),
		InitStd:          float32(c.init_std),
		Backend:          Backend(c.backend),
		LocalShards:      uint32(c.local_shards),
		WorldSize:        uint32(c.world_size),
		FirstRank:        uint32(c.first_rank),
	}
}

// cBytes copies b into C memory (nil for an empty slice); free it with C.free.
func cBytes(b unsafe.Pointer, n int) unsafe.Pointer {
	if n == 0 {
		return nil
	}
	p := C.malloc(C.size_t(n))
	copy(unsafe.Slice((*byte)(p), n), unsafe.Slice((*byte)(b), n))
	return p
}

// StepStats is what a step or an evaluation reports.
type StepStats struct {
	Loss           float64 // mean softmax cross-entropy over the global batch
	Accuracy       float64 // top-1 over the sampled columns (Evaluate: all classes)
	Step           uint64  // training steps taken by the head, this one included
	GlobalBatch    uint64
	SampledClasses uint64
}

// Batch is one local shard's f32 batch: rows = len(Labels), Embeddings rows × EmbeddingDim values,
// Grad the same size (written by TrainStep; ignored by Evaluate).
type Batch struct {
	Embeddings []float32
	Labels     []int64
	Grad       []float32
}

// HalfBatch is one local shard's batch in f16 or bf16 (raw 16-bit values), for TrainStepHalf and
// EvaluateHalf.
type HalfBatch struct {
	Embeddings []uint16
	Labels     []int64
	Grad       []uint16
}

// shardBuf is a batch's memory: Go pointers (or nil) with byte lengths.
type shardBuf struct {
	emb       unsafe.Pointer
	embBytes  int
	labels    unsafe.Pointer
	rows      int
	grad      unsafe.Pointer
	gradBytes int
}

// SearchResult holds the K best classes of each of N queries, row-major.
type SearchResult struct {
	N, K   int
	IDs    []int64
	Scores []float32
}

// Hits are query q's classes and cosines, best first.
func (r SearchResult) Hits(q int) ([]int64, []float32) {
	return r.IDs[q*r.K : (q+1)*r.K], r.Scores[q*r.K : (q+1)*r.K]
}

// Head is a training head (pfc_head). Close frees it.
type Head struct {
	mu     sync.RWMutex // calls hold it shared, Close exclusively
	ptr    *C.pfc_head
	dim    int
	shards int
}

// finalized counts heads freed by the finalizer (for the tests).
var finalized int64

// New creates a head (pfc_create).
func New(cfg Config) (*Head, error) {
	const op = "pfc_create"
	if cfg.Devices != nil && len(cfg.Devices) != int(cfg.LocalShards) {
		return nil, invalid(op, "Devices has %d entries for %d local shards", len(cfg.Devices), cfg.LocalShards)
	}
	if cfg.NCCLID != nil && len(cfg.NCCLID) != NCCLIDBytes {
		return nil, invalid(op, "NCCLID has %d bytes; expected %d", len(cfg.NCCLID), NCCLIDBytes)
	}
	c := (*C.pfc_config)(C.malloc(C.size_t(unsafe.Sizeof(C.pfc_config{}))))
	defer C.free(unsafe.Pointer(c))
	C.pfc_config_init(c)
	c.num_classes = C.uint64_t(cfg.NumClasses)
	c.embedding_dim = C.uint32_t(cfg.EmbeddingDim)
	c.sample_rate = C.float(cfg.SampleRate)
	c.scale = C.float(cfg.Scale)
	c.m1 = C.float(cfg.M1)
	c.m2 = C.float(cfg.M2)
	c.m3 = C.float(cfg.M3)
	c.interclass_filter = C.float(cfg.InterclassFilter)
	c.margin_grad = C.int32_t(cfg.MarginGrad)
	c.arcface_fallback = 0
	if cfg.ArcfaceFallback {
		c.arcface_fallback = 1
	}
	c.margin_kind = C.int32_t(cfg.MarginKind)
	c.margin_m = C.float(cfg.MarginM)
	c.adaface_h = C.float(cfg.AdaFaceH)
	c.adaface_t_alpha = C.float(cfg.AdaFaceTAlpha)
	c.optimizer = C.int32_t(cfg.Optimizer)
	c.lr = C.float(cfg.LR)
	c.momentum = C.float(cfg.Momentum)
	c.weight_decay = C.float(cfg.WeightDecay)
	c.beta1 = C.float(cfg.Beta1)
	c.beta2 = C.float(cfg.Beta2)
	c.eps = C.float(cfg.Eps)
	c.compute_dtype = C.int32_t(cfg.ComputeDType)
	c.storage_dtype = C.int32_t(cfg.StorageDType)
	c.seed = C.uint64_t(cfg.Seed)
	c.init_std = C.float(cfg.InitStd)
	c.backend = C.int32_t(cfg.Backend)
	c.local_shards = C.uint32_t(cfg.LocalShards)
	c.world_size = C.uint32_t(cfg.WorldSize)
	c.first_rank = C.uint32_t(cfg.FirstRank)
	if len(cfg.Devices) > 0 {
		p := cBytes(unsafe.Pointer(&cfg.Devices[0]), len(cfg.Devices)*4)
		defer C.free(p)
		c.devices = (*C.int32_t)(p)
	}
	if len(cfg.NCCLID) > 0 {
		p := cBytes(unsafe.Pointer(&cfg.NCCLID[0]), len(cfg.NCCLID))
		defer C.free(p)
		c.nccl_id = (*C.uint8_t)(p)
	}
	out := (**C.pfc_head)(C.malloc(C.size_t(unsafe.Sizeof(uintptr(0)))))
	defer C.free(unsafe.Pointer(out))
	*out = nil
	if err := call(op, func() C.pfc_status { return C.pfc_create(c, out) }); err != nil {
		return nil, err
	}
	h := &Head{ptr: *out, dim: int(cfg.EmbeddingDim), shards: int(cfg.LocalShards)}
	runtime.SetFinalizer(h, func(h *Head) {
		if h.ptr != nil {
			atomic.AddInt64(&finalized, 1)
		}
		_ = h.Close()
	})
	return h, nil
}

// Close frees the head. It is idempotent; later calls on the head return ErrClosed.
func (h *Head) Close() error {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ptr != nil {
		C.pfc_destroy(h.ptr)
		h.ptr = nil
		runtime.SetFinalizer(h, nil)
	}
	return nil
}

// acquire holds the head for one call; release with h.mu.RUnlock (only when err is nil).
func (h *Head) acquire(op string) (*C.pfc_head, error) {
	if h == nil {
		return nil, closedError(op)
	}
	h.mu.RLock()
	if h.ptr == nil {
		h.mu.RUnlock()
		return nil, closedError(op)
	}
	return h.ptr, nil
}

func (h *Head) release() {
	h.mu.RUnlock()
	runtime.KeepAlive(h)
}

// EmbeddingDim is the configured embedding dimension.
func (h *Head) EmbeddingDim() int {
	if h == nil {
		return 0
	}
	return h.dim
}

// LocalShards is the number of batches TrainStep and Evaluate take.
func (h *Head) LocalShards() int {
	if h == nil {
		return 0
	}
	return h.shards
}

// TrainStep runs one training step over one batch per local shard; each Grad receives world_size ×
// the gradient of the mean loss with respect to its embeddings.
func (h *Head) TrainStep(batches ...Batch) (StepStats, error) {
	return h.stepF32("pfc_train_step", true, batches)
}

// Evaluate computes loss and accuracy over all classes; nothing changes and Grad is ignored.
func (h *Head) Evaluate(batches ...Batch) (StepStats, error) {
	return h.stepF32("pfc_evaluate", false, batches)
}

// TrainStepHalf is TrainStep for f16 or bf16 embeddings and gradients (dtype DTypeF16 or DTypeBF16).
func (h *Head) TrainStepHalf(dtype DType, batches ...HalfBatch) (StepStats, error) {
	return h.stepHalf("pfc_train_step", true, dtype, batches)
}

// EvaluateHalf is Evaluate for f16 or bf16 embeddings.
func (h *Head) EvaluateHalf(dtype DType, batches ...HalfBatch) (StepStats, error) {
	return h.stepHalf("pfc_evaluate", false, dtype, batches)
}

func ptrOf(p unsafe.Pointer, n int) unsafe.Pointer {
	if n == 0 {
		return nil
	}
	return p
}

// shard checks one batch's lengths against the dimension and returns its buffers.
func (h *Head) shard(op string, i int, train bool, emb unsafe.Pointer, nemb int, labels []int64, grad unsafe.Pointer,
	ngrad int, elem int) (shardBuf, error) {
	rows := len(labels)
	want := rows * h.dim
	if nemb != 0 && nemb != want {
		return shardBuf{}, invalid(op, "batch %d: Embeddings hold %d values; %d labels × dimension %d need %d", i, nemb, rows, h.dim, want)
	}
	b := shardBuf{emb: ptrOf(emb, nemb), embBytes: nemb * elem, rows: rows}
	if rows > 0 {
		b.labels = unsafe.Pointer(&labels[0])
	}
	if train {
		if ngrad != 0 && ngrad != want {
			return shardBuf{}, invalid(op, "batch %d: Grad holds %d values; %d needed", i, ngrad, want)
		}
		b.grad, b.gradBytes = ptrOf(grad, ngrad), ngrad*elem
	}
	return b, nil
}

// first points at s's first element, or is nil for an empty slice.
func first[T any](s []T) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Pointer(&s[0])
}

// shardParts is one batch's embeddings, labels and gradient, whatever its element type.
type shardParts struct {
	emb    unsafe.Pointer
	nemb   int
	labels []int64
	grad   unsafe.Pointer
	ngrad  int
}

func (h *Head) stepF32(op string, train bool, batches []Batch) (StepStats, error) {
	return h.stepWith(op, train, DTypeF32, 4, len(batches), func(i int) shardParts {
		b := batches[i]
		return shardParts{first(b.Embeddings), len(b.Embeddings), b.Labels, first(b.Grad), len(b.Grad)}
	})
}

func (h *Head) stepHalf(op string, train bool, dtype DType, batches []HalfBatch) (StepStats, error) {
	return h.stepWith(op, train, dtype, 2, len(batches), func(i int) shardParts {
		b := batches[i]
		return shardParts{first(b.Embeddings), len(b.Embeddings), b.Labels, first(b.Grad), len(b.Grad)}
	})
}

// stepWith holds the head for one step over n batches of `elem`-byte values of `dtype`.
func (h *Head) stepWith(op string, train bool, dtype DType, elem int, n int, part func(int) shardParts) (StepStats, error) {
	head, err := h.acquire(op)
	if err != nil {
		return StepStats{}, err
	}
	defer h.release()
	if elem == 2 && dtype != DTypeF16 && dtype != DTypeBF16 {
		return StepStats{}, invalid(op, "dtype %d: half batches hold DTypeF16 or DTypeBF16 values", int32(dtype))
	}
	bufs := make([]shardBuf, n)
	for i := range bufs {
		p := part(i)
		if bufs[i], err = h.shard(op, i, train, p.emb, p.nemb, p.labels, p.grad, p.ngrad, elem); err != nil {
			return StepStats{}, err
		}
	}
	return step(head, op, train, dtype, bufs)
}

// step makes the C call; the caller holds the head.
func step(head *C.pfc_head, op string, train bool, dtype DType, bufs []shardBuf) (StepStats, error) {
	if uint64(len(bufs)) > math.MaxUint32 {
		return StepStats{}, invalid(op, "%d batches", len(bufs))
	}
	var st C.pfc_step_stats
	trainFlag := C.int(0)
	if train {
		trainFlag = 1
	}
	err := call(op, func() C.pfc_status {
		if len(bufs) == 1 {
			b := bufs[0]
			return C.pfcgo_step1(head, trainFlag, b.emb, (*C.int64_t)(b.labels), b.grad, C.uint64_t(b.rows), C.int32_t(dtype), &st)
		}
		return stepBatches(head, trainFlag, C.int32_t(dtype), bufs, &st)
	})
	if err != nil {
		return StepStats{}, err
	}
	return StepStats{
		Loss:           float64(st.loss),
		Accuracy:       float64(st.accuracy),
		Step:           uint64(st.step),
		GlobalBatch:    uint64(st.global_batch),
		SampledClasses: uint64(st.sampled_classes),
	}, nil
}

// newCBatches allocates n zeroed pfc_batch structs in C memory (C.free them).
func newCBatches(n int) (*C.pfc_batch, []C.pfc_batch) {
	p := (*C.pfc_batch)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.pfc_batch{}))))
	s := unsafe.Slice(p, n)
	for i := range s {
		s[i] = C.pfc_batch{}
	}
	return p, s
}

// SetLearningRate sets the learning rate of later steps (finite, >= 0).
func (h *Head) SetLearningRate(lr float32) error {
	const op = "pfc_set_learning_rate"
	head, err := h.acquire(op)
	if err != nil {
		return err
	}
	defer h.release()
	return call(op, func() C.pfc_status { return C.pfc_set_learning_rate(head, C.float(lr)) })
}

func localClasses(head *C.pfc_head) (uint64, uint64, error) {
	out := (*C.uint64_t)(C.malloc(16))
	defer C.free(unsafe.Pointer(out))
	pair := unsafe.Slice(out, 2)
	err := call("pfc_local_classes", func() C.pfc_status { return C.pfc_local_classes(head, &pair[0], &pair[1]) })
	return uint64(pair[0]), uint64(pair[1]), err
}

// MarginState is the margin's running statistics (AdaFace: running norm mean and standard
// deviation; CurricularFace: t; none for the combined margin), the same on every shard and process.
func (h *Head) MarginState() ([]float32, error) {
	const op = "pfc_margin_state"
	head, err := h.acquire(op)
	if err != nil {
		return nil, err
	}
	defer h.release()
	const capacity = 8
	out := (*C.float)(C.malloc(C.size_t(capacity * 4)))
	defer C.free(unsafe.Pointer(out))
	length := (*C.uint32_t)(C.malloc(4))
	defer C.free(unsafe.Pointer(length))
	if err := call(op, func() C.pfc_status { return C.pfc_margin_state(head, out, capacity, length) }); err != nil {
		return nil, err
	}
	state := make([]float32, *length)
	for i, v := range unsafe.Slice(out, int(*length)) {
		state[i] = float32(v)
	}
	return state, nil
}

// SetMarginState restores the margin's running statistics as MarginState listed them (e.g. before
// recomputing a step); give every process the same values. A malformed list changes nothing.
func (h *Head) SetMarginState(values []float32) error {
	const op = "pfc_set_margin_state"
	head, err := h.acquire(op)
	if err != nil {
		return err
	}
	defer h.release()
	if uint64(len(values)) > math.MaxUint32 {
		return invalid(op, "%d values are too many", len(values))
	}
	var p *C.float
	if len(values) > 0 {
		p = (*C.float)(&values[0])
	}
	return call(op, func() C.pfc_status { return C.pfc_set_margin_state(head, p, C.uint32_t(len(values))) })
}

// LocalClasses is the range of global classes this process owns: [first, first+count).
func (h *Head) LocalClasses() (first, count uint64, err error) {
	head, err := h.acquire("pfc_local_classes")
	if err != nil {
		return 0, 0, err
	}
	defer h.release()
	return localClasses(head)
}

// Centers copies the centers of classes [first, first+count), count × EmbeddingDim values,
// L2-normalized rows when normalized is true.
func (h *Head) Centers(first, count uint64, normalized bool) ([]float32, error) {
	const op = "pfc_get_centers"
	head, err := h.acquire(op)
	if err != nil {
		return nil, err
	}
	defer h.release()
	norm := C.int32_t(0)
	if normalized {
		norm = 1
	}
	_, local, err := localClasses(head)
	if err != nil {
		return nil, err
	}
	if count == 0 || count > local {
		// The library refuses this before writing anything; let it say why.
		var dummy [1]float32
		err := call(op, func() C.pfc_status {
			return C.pfc_get_centers(head, C.uint64_t(first), C.uint64_t(count), norm, (*C.float)(&dummy[0]))
		})
		if err == nil {
			err = invalid(op, "count = %d is outside [1, %d]", count, local)
		}
		return nil, err
	}
	out := make([]float32, int(count)*h.dim)
	err = call(op, func() C.pfc_status {
		return C.pfc_get_centers(head, C.uint64_t(first), C.uint64_t(count), norm, (*C.float)(&out[0]))
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// SetCenters overwrites the centers of classes [first, first+len(values)/EmbeddingDim) and resets
// their optimizer state (warm start).
func (h *Head) SetCenters(first uint64, values []float32) error {
	const op = "pfc_set_centers"
	head, err := h.acquire(op)
	if err != nil {
		return err
	}
	defer h.release()
	if h.dim == 0 || len(values)%h.dim != 0 {
		return invalid(op, "%d values are not whole rows of dimension %d", len(values), h.dim)
	}
	var p *C.float
	if len(values) > 0 {
		p = (*C.float)(&values[0])
	}
	return call(op, func() C.pfc_status {
		return C.pfc_set_centers(head, C.uint64_t(first), C.uint64_t(len(values)/h.dim), p)
	})
}

// Search returns the k classes with the highest cosine to each query (len(queries)/EmbeddingDim
// rows), best first, ties to the smaller class id.
func (h *Head) Search(queries []float32, k int) (SearchResult, error) {
	return h.SearchContext(context.Background(), queries, k)
}

// SearchContext is Search in chunks of SearchChunkRows queries, ctx checked before each; a
// cancelled search returns ctx's error and no results.
func (h *Head) SearchContext(ctx context.Context, queries []float32, k int) (SearchResult, error) {
	const op = "pfc_search"
	head, err := h.acquire(op)
	if err != nil {
		return SearchResult{}, err
	}
	defer h.release()
	_, local, err := localClasses(head)
	if err != nil {
		return SearchResult{}, err
	}
	return searchChunked(ctx, op, queries, h.dim, k, local, func(q *C.float, n C.uint64_t, k C.uint32_t, ids *C.int64_t, scores *C.float) C.pfc_status {
		return C.pfc_search(head, q, n, k, ids, scores)
	})
}

// pathCall runs a C function taking a path, as a C string that lives for the call.
func (h *Head) pathCall(op, what, path string, f func(*C.pfc_head, *C.char) C.pfc_status) error {
	head, err := h.acquire(op)
	if err != nil {
		return err
	}
	defer h.release()
	if strings.IndexByte(path, 0) >= 0 {
		return invalid(op, "%s %q contains a NUL byte", what, path)
	}
	cs := C.CString(path)
	defer C.free(unsafe.Pointer(cs))
	return call(op, func() C.pfc_status { return f(head, cs) })
}

// Save writes a checkpoint (centers and optimizer state) into directory dir, atomically.
func (h *Head) Save(dir string) error {
	return h.pathCall("pfc_save_checkpoint", "dir", dir, func(p *C.pfc_head, s *C.char) C.pfc_status {
		return C.pfc_save_checkpoint(p, s)
	})
}

// Load restores a checkpoint written by Save (any shard count). A damaged checkpoint gives
// StatusCorrupt, another shape or optimizer StatusIncompatible; on error the head is unchanged.
func (h *Head) Load(dir string) error {
	return h.pathCall("pfc_load_checkpoint", "dir", dir, func(p *C.pfc_head, s *C.char) C.pfc_status {
		return C.pfc_load_checkpoint(p, s)
	})
}

// Export writes all centers to one file: FormatSafetensors, FormatNPY, FormatFvecs or FormatFAISS,
// in DTypeF32, DTypeF16 or DTypeBF16 (bf16: safetensors only; .fvecs and FAISS: f32 only),
// L2-normalized rows when normalized is true. Narrower types hold each value rounded to nearest; a
// head storing bf16 exports its stored values exactly as unnormalized DTypeBF16.
func (h *Head) Export(path string, format Format, dtype DType, normalized bool) error {
	norm := C.int32_t(0)
	if normalized {
		norm = 1
	}
	return h.pathCall("pfc_export_centers", "path", path, func(p *C.pfc_head, s *C.char) C.pfc_status {
		return C.pfc_export_centers(p, s, C.int32_t(format), C.int32_t(dtype), norm)
	})
}
