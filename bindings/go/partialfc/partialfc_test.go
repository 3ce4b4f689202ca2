package partialfc

import (
	"bytes"
	"errors"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	numClasses = 64
	dim        = 16
	rows       = 48
)

// problem is a synthetic identification task: random prototypes, noisy embeddings.
type problem struct {
	prototypes []float32 // numClasses × dim
	emb        []float32 // rows × dim
	labels     []int64
}

func newProblem(seed uint64) problem {
	state := seed
	uniform := func() float32 { // in [-1, 1)
		state = state*6364136223846793005 + 1442695040888963407
		return float32((state>>40)&0xffffff)/8388608.0 - 1
	}
	p := problem{prototypes: make([]float32, numClasses*dim), emb: make([]float32, rows*dim), labels: make([]int64, rows)}
	for i := range p.prototypes {
		p.prototypes[i] = uniform()
	}
	for i := 0; i < rows; i++ {
		p.labels[i] = int64((i*7 + 3) % numClasses)
		for j := 0; j < dim; j++ {
			p.emb[i*dim+j] = 3 * (p.prototypes[int(p.labels[i])*dim+j] + 0.3*uniform())
		}
	}
	return p
}

func testConfig(shards uint32) Config {
	cfg := DefaultConfig()
	cfg.NumClasses = numClasses
	cfg.EmbeddingDim = dim
	cfg.LocalShards = shards
	cfg.Seed = 11
	cfg.Scale = 16
	cfg.M2 = 0.2
	cfg.LR = 0.5
	return cfg
}

func newHead(t *testing.T, cfg Config) *Head {
	t.Helper()
	h, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// split gives two uneven shards over the problem's rows, with gradients in grad.
func split(p problem, grad []float32) []Batch {
	const first = 30
	return []Batch{
		{Embeddings: p.emb[:first*dim], Labels: p.labels[:first], Grad: grad[:first*dim]},
		{Embeddings: p.emb[first*dim:], Labels: p.labels[first:], Grad: grad[first*dim:]},
	}
}

func allCenters(t *testing.T, h *Head) []float32 {
	t.Helper()
	c, err := h.Centers(0, numClasses, false)
	if err != nil {
		t.Fatalf("Centers: %v", err)
	}
	return c
}

func equal(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// wantErr checks that err is an *Error with the given status and C function whose message
// mentions needle.
func wantErr(t *testing.T, err error, status Status, op, needle string) {
	t.Helper()
	if err == nil {
		t.Fatalf("expected %v (%s) mentioning %q, got no error", status, op, needle)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("expected *partialfc.Error, got %T: %v", err, err)
	}
	if e.Status != status || !errors.Is(err, status) || e.Op != op || e.Message == "" || !strings.Contains(e.Message, needle) {
		t.Fatalf("expected %v from %s mentioning %q, got %v", status, op, needle, err)
	}
	if !strings.Contains(err.Error(), e.Message) || !strings.Contains(err.Error(), status.String()) {
		t.Fatalf("Error() = %q lacks the status or message", err.Error())
	}
}

func TestVersionAndDefaults(t *testing.T) {
	if v := Version(); v == "" || !strings.Contains(v, ".") {
		t.Fatalf("Version() = %q", v)
	}
	c := DefaultConfig()
	if c.Scale != 64 || c.M1 != 1 || c.M2 != 0.5 || c.M3 != 0 || c.SampleRate != 1 || c.LR != 0.1 || c.Momentum != 0.9 ||
		c.WeightDecay != 5e-4 || c.Beta1 != 0.9 || c.Beta2 != 0.999 || c.Eps != 1e-8 || c.InitStd != 0.01 ||
		c.Optimizer != OptimizerSGD || c.Backend != BackendCPU || c.ComputeDType != DTypeF32 || c.StorageDType != DTypeF32 || c.LocalShards != 1 ||
		c.MarginGrad != MarginGradStraightThrough || c.ArcfaceFallback || c.NumClasses != 0 || c.EmbeddingDim != 0 {
		t.Fatalf("unexpected defaults: %+v", c)
	}
	// An NCCL id where NCCL loads, StatusUnavailable (with a message) where it does not.
	if id, err := NCCLUniqueID(); err != nil {
		wantErr(t, err, StatusUnavailable, "pfc_nccl_unique_id", "")
	} else if len(id) != NCCLIDBytes {
		t.Fatalf("NCCL id of %d bytes", len(id))
	}
	if StatusCorrupt.String() != "PFC_ERR_CORRUPT" || Status(99).String() != "pfc_status(99)" || NCCLIDBytes != 128 {
		t.Fatal("status names or constants")
	}
}

func TestNewErrors(t *testing.T) {
	cfg := testConfig(1)
	cfg.NumClasses = 0
	_, err := New(cfg)
	wantErr(t, err, StatusInvalidArgument, "pfc_create", "num_classes")

	cfg = testConfig(1)
	cfg.Backend = BackendCUDA
	_, err = New(cfg)
	wantErr(t, err, StatusUnavailable, "pfc_create", "CUDA")

	cfg = testConfig(1)
	cfg.Optimizer = 7
	_, err = New(cfg)
	wantErr(t, err, StatusInvalidArgument, "pfc_create", "optimizer")

	cfg = testConfig(2)
	cfg.Devices = []int32{0}
	_, err = New(cfg)
	wantErr(t, err, StatusInvalidArgument, "pfc_create", "Devices")

	cfg = testConfig(1)
	cfg.NCCLID = []byte{1, 2}
	_, err = New(cfg)
	wantErr(t, err, StatusInvalidArgument, "pfc_create", "NCCLID")

	cfg = testConfig(1)
	cfg.WorldSize = 2 // more shards than local ones needs an NCCL id
	_, err = New(cfg)
	wantErr(t, err, StatusNullArgument, "pfc_create", "nccl_id")

	// A zero Config (not from DefaultConfig) is refused, not silently filled in.
	_, err = New(Config{NumClasses: 10, EmbeddingDim: 4})
	if !errors.Is(err, StatusInvalidArgument) {
		t.Fatalf("zero Config: %v", err)
	}
}

// AdaFace through the binding: its running statistics start at 20 and 100, move with a step and
// are restored as saved (a malformed list changes nothing); the combined margin's options beside it
// are refused naming the field.
func TestAdaFace(t *testing.T) {
	cfg := testConfig(1)
	cfg.MarginKind = MarginAdaFace
	cfg.M2 = DefaultConfig().M2
	h := newHead(t, cfg)
	if state, err := h.MarginState(); err != nil || len(state) != 2 || state[0] != 20 || state[1] != 100 {
		t.Fatalf("MarginState = %v, %v", state, err)
	}
	p := newProblem(1)
	grad := make([]float32, rows*dim)
	if st, err := h.TrainStep(Batch{Embeddings: p.emb, Labels: p.labels, Grad: grad}); err != nil || math.IsNaN(st.Loss) {
		t.Fatalf("TrainStep = %+v, %v", st, err)
	}
	if state, err := h.MarginState(); err != nil || len(state) != 2 || state[0] == 20 || state[1] == 100 {
		t.Fatalf("MarginState after a step = %v, %v", state, err)
	}
	if err := h.SetMarginState([]float32{20, 100}); err != nil {
		t.Fatalf("SetMarginState: %v", err)
	}
	var bad *Error
	if err := h.SetMarginState([]float32{20}); !errors.As(err, &bad) || bad.Status != StatusInvalidArgument {
		t.Fatalf("SetMarginState with one value: %v", err)
	}
	if state, err := h.MarginState(); err != nil || len(state) != 2 || state[0] != 20 || state[1] != 100 {
		t.Fatalf("MarginState after SetMarginState = %v, %v", state, err)
	}
	cfg.M2 = 0.3
	var e *Error
	if _, err := New(cfg); !errors.As(err, &e) || e.Status != StatusInvalidArgument || !strings.HasPrefix(e.Message, "m2") {
		t.Fatalf("New with M2 beside AdaFace: %v", err)
	}
}

func TestTrainingLowersLoss(t *testing.T) {
	p := newProblem(1)
	h := newHead(t, testConfig(2))
	if h.EmbeddingDim() != dim || h.LocalShards() != 2 {
		t.Fatal("EmbeddingDim or LocalShards")
	}
	if first, count, err := h.LocalClasses(); err != nil || first != 0 || count != numClasses {
		t.Fatalf("LocalClasses = %d, %d, %v", first, count, err)
	}
	grad := make([]float32, rows*dim)
	batches := split(p, grad)

	ev, err := h.Evaluate(batches...)
	if err != nil || ev.Step != 0 || ev.GlobalBatch != rows || ev.SampledClasses != numClasses || !(ev.Loss > 0) {
		t.Fatalf("Evaluate = %+v, %v", ev, err)
	}
	var first, last float64
	for step := 1; step <= 10; step++ {
		st, err := h.TrainStep(batches...)
		if err != nil {
			t.Fatalf("TrainStep: %v", err)
		}
		if st.Step != uint64(step) || st.GlobalBatch != rows || math.IsNaN(st.Loss) {
			t.Fatalf("step %d: %+v", step, st)
		}
		if step == 1 {
			first = st.Loss
			if math.Abs(st.Loss-ev.Loss) > 1e-3*ev.Loss {
				t.Fatalf("first step loss %v, evaluation %v", st.Loss, ev.Loss)
			}
		}
		last = st.Loss
	}
	if !(last < 0.7*first) {
		t.Fatalf("loss went from %v to %v", first, last)
	}
	var gsum float64
	for _, g := range grad {
		gsum += math.Abs(float64(g))
	}
	if !(gsum > 0) || math.IsNaN(gsum) {
		t.Fatalf("gradient sum %v", gsum)
	}
	ev2, err := h.Evaluate(batches...)
	if err != nil || !(ev2.Loss < ev.Loss) || ev2.Step != 10 || ev2.Accuracy < ev.Accuracy {
		t.Fatalf("Evaluate after training = %+v, %v (before %+v)", ev2, err, ev)
	}

	// One shard may be empty; a single shard takes the zero-copy path.
	if st, err := h.TrainStep(Batch{Embeddings: p.emb, Labels: p.labels, Grad: grad}, Batch{}); err != nil || st.GlobalBatch != rows {
		t.Fatalf("lopsided step: %+v, %v", st, err)
	}
	single := newHead(t, testConfig(1))
	s1, err := single.TrainStep(Batch{Embeddings: p.emb, Labels: p.labels, Grad: grad})
	if err != nil || s1.Step != 1 {
		t.Fatalf("single shard: %+v, %v", s1, err)
	}

	// Learning rate 0 freezes the centers; a bad rate is refused and changes nothing.
	if err := h.SetLearningRate(0); err != nil {
		t.Fatal(err)
	}
	frozen := allCenters(t, h)
	if _, err := h.TrainStep(batches...); err != nil {
		t.Fatal(err)
	}
	if !equal(frozen, allCenters(t, h)) {
		t.Fatal("lr 0 changed the centers")
	}
	wantErr(t, h.SetLearningRate(float32(math.NaN())), StatusInvalidArgument, "pfc_set_learning_rate", "learning rate")
	wantErr(t, h.SetLearningRate(-1), StatusInvalidArgument, "pfc_set_learning_rate", "learning rate")
}

func TestErrorPaths(t *testing.T) {
	p := newProblem(2)
	h := newHead(t, testConfig(2))
	grad := make([]float32, rows*dim)
	batches := split(p, grad)
	if _, err := h.TrainStep(batches...); err != nil {
		t.Fatal(err)
	}
	before := allCenters(t, h)
	for i := range grad {
		grad[i] = 7
	}

	// A bad label.
	p.labels[rows-1] = numClasses
	_, err := h.TrainStep(batches...)
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "label")
	p.labels[rows-1] = -1
	_, err = h.Evaluate(batches...)
	wantErr(t, err, StatusInvalidArgument, "pfc_evaluate", "label")
	p.labels[rows-1] = int64(((rows-1)*7 + 3) % numClasses)

	// NaN embeddings.
	saved := p.emb[3]
	p.emb[3] = float32(math.NaN())
	_, err = h.TrainStep(batches...)
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "NaN")
	p.emb[3] = saved

	// NULL / empty input: nil slices reach C as NULL.
	_, err = h.TrainStep(Batch{Labels: p.labels[:30], Grad: grad[:30*dim]}, batches[1])
	wantErr(t, err, StatusNullArgument, "pfc_train_step", "embeddings")
	_, err = h.TrainStep(Batch{Embeddings: p.emb[:30*dim], Labels: p.labels[:30]}, batches[1])
	wantErr(t, err, StatusNullArgument, "pfc_train_step", "grad_embeddings")
	if _, err := h.Evaluate(Batch{Embeddings: p.emb[:30*dim], Labels: p.labels[:30]}, batches[1]); err != nil {
		t.Fatalf("Evaluate needs no Grad: %v", err)
	}
	_, err = h.TrainStep()
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "batches")
	_, err = h.TrainStep(batches[0])
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "batches")
	_, err = h.TrainStep(Batch{}, Batch{})
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "empty")
	one := newHead(t, testConfig(1))
	_, err = one.TrainStep(Batch{Labels: p.labels, Grad: grad})
	wantErr(t, err, StatusNullArgument, "pfc_train_step", "embeddings")
	_, err = one.TrainStep(Batch{})
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "empty")

	// Lengths the wrapper checks before calling C.
	_, err = h.TrainStep(Batch{Embeddings: p.emb[:30*dim-1], Labels: p.labels[:30], Grad: grad[:30*dim]}, batches[1])
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "Embeddings hold")
	_, err = h.TrainStep(Batch{Embeddings: p.emb[:30*dim], Labels: p.labels[:30], Grad: grad[:dim]}, batches[1])
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "Grad holds")
	_, err = h.TrainStep(Batch{Embeddings: p.emb[:dim]}, batches[1])
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "0 labels")
	_, err = h.TrainStepHalf(DTypeF32, HalfBatch{}, HalfBatch{})
	wantErr(t, err, StatusInvalidArgument, "pfc_train_step", "DTypeF16")

	// Nothing changed: centers and gradients as before.
	if !equal(before, allCenters(t, h)) {
		t.Fatal("a failed call changed the centers")
	}
	for _, g := range grad {
		if g != 7 {
			t.Fatal("a failed call wrote the gradient")
		}
	}

	// Centers.
	_, err = h.Centers(numClasses-1, 2, false)
	wantErr(t, err, StatusInvalidArgument, "pfc_get_centers", "class")
	_, err = h.Centers(0, 0, false)
	wantErr(t, err, StatusInvalidArgument, "pfc_get_centers", "count")
	_, err = h.Centers(0, numClasses+1, false)
	wantErr(t, err, StatusInvalidArgument, "pfc_get_centers", "count")
	wantErr(t, h.SetCenters(0, nil), StatusNullArgument, "pfc_set_centers", "in")
	wantErr(t, h.SetCenters(0, make([]float32, dim+1)), StatusInvalidArgument, "pfc_set_centers", "dimension")
	inf := make([]float32, 2*dim)
	inf[dim+2] = float32(math.Inf(1))
	wantErr(t, h.SetCenters(0, inf), StatusInvalidArgument, "pfc_set_centers", "NaN")
	wantErr(t, h.SetCenters(numClasses-1, make([]float32, 2*dim)), StatusInvalidArgument, "pfc_set_centers", "class")

	// Search.
	_, err = h.Search(nil, 3)
	wantErr(t, err, StatusNullArgument, "pfc_search", "queries")
	_, err = h.Search(p.emb[:2*dim], 0)
	wantErr(t, err, StatusInvalidArgument, "pfc_search", "k")
	_, err = h.Search(p.emb[:2*dim], numClasses+1)
	wantErr(t, err, StatusInvalidArgument, "pfc_search", "k")
	_, err = h.Search(p.emb[:dim+1], 1)
	wantErr(t, err, StatusInvalidArgument, "pfc_search", "dimension")

	// Paths.
	wantErr(t, h.Save(""), StatusInvalidArgument, "pfc_save_checkpoint", "empty")
	wantErr(t, h.Load("a\x00b"), StatusInvalidArgument, "pfc_load_checkpoint", "NUL")
	wantErr(t, h.Export(filepath.Join(t.TempDir(), "c.npy"), 9, DTypeF32, true), StatusInvalidArgument, "pfc_export_centers", "format")
	if !equal(before, allCenters(t, h)) {
		t.Fatal("a failed call changed the centers")
	}
}

func TestCheckpointAndCorruption(t *testing.T) {
	p := newProblem(3)
	cfg := testConfig(2)
	cfg.Optimizer = OptimizerAdamW
	cfg.LR = 0.05
	h := newHead(t, cfg)
	grad := make([]float32, rows*dim)
	batches := split(p, grad)
	for i := 0; i < 3; i++ {
		if _, err := h.TrainStep(batches...); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(t.TempDir(), "ckpt")
	if err := h.Save(dir); err != nil {
		t.Fatal(err)
	}
	saved := allCenters(t, h)
	if _, err := h.TrainStep(batches...); err != nil {
		t.Fatal(err)
	}
	if err := h.Load(dir); err != nil {
		t.Fatal(err)
	}
	if !equal(saved, allCenters(t, h)) {
		t.Fatal("Load did not restore the centers")
	}
	if ev, err := h.Evaluate(batches...); err != nil || ev.Step != 3 {
		t.Fatalf("step after Load: %+v, %v", ev, err)
	}
	// A one-shard head reads the two-shard checkpoint.
	one := cfg
	one.LocalShards = 1
	h1 := newHead(t, one)
	if err := h1.Load(dir); err != nil || !equal(saved, allCenters(t, h1)) {
		t.Fatalf("resharded load: %v", err)
	}

	wantErr(t, h.Load(filepath.Join(t.TempDir(), "missing")), StatusIO, "pfc_load_checkpoint", "missing")
	other := cfg
	other.NumClasses = numClasses + 1
	wantErr(t, newHead(t, other).Load(dir), StatusIncompatible, "pfc_load_checkpoint", "classes")
	wantErr(t, newHead(t, testConfig(2)).Load(dir), StatusIncompatible, "pfc_load_checkpoint", "optimizer")

	// Corrupt files: altered, truncated, a damaged manifest. The head stays as it was.
	if _, err := h.TrainStep(batches...); err != nil {
		t.Fatal(err)
	}
	current := allCenters(t, h)
	shards, _ := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if len(shards) != 2 {
		t.Fatalf("expected 2 shard files, found %v", shards)
	}
	original, err := os.ReadFile(shards[1])
	if err != nil {
		t.Fatal(err)
	}
	altered := append([]byte(nil), original...)
	altered[len(altered)-5] ^= 0x40
	mustWrite(t, shards[1], altered)
	// Found by the checksum or by a check of the values read first; either way the file is named.
	wantErr(t, h.Load(dir), StatusCorrupt, "pfc_load_checkpoint", filepath.Base(shards[1]))
	mustWrite(t, shards[1], original[:len(original)/2])
	wantErr(t, h.Load(dir), StatusCorrupt, "pfc_load_checkpoint", "truncated")
	mustWrite(t, shards[1], original)
	manifest := filepath.Join(dir, "manifest.json")
	m, _ := os.ReadFile(manifest)
	mustWrite(t, manifest, bytes.Replace(m, []byte(`"step":3`), []byte(`"step":9`), 1))
	wantErr(t, h.Load(dir), StatusCorrupt, "pfc_load_checkpoint", "manifest")
	mustWrite(t, manifest, m[:len(m)-4])
	wantErr(t, h.Load(dir), StatusCorrupt, "pfc_load_checkpoint", "manifest")
	if !equal(current, allCenters(t, h)) {
		t.Fatal("a failed Load changed the head")
	}
	mustWrite(t, manifest, m)
	if err := h.Load(dir); err != nil || !equal(saved, allCenters(t, h)) {
		t.Fatalf("Load after repair: %v", err)
	}
}

// allBF16 reports whether every value is a bf16 widened to float32: its low 16 bits zero.
func allBF16(v []float32) bool {
	for _, x := range v {
		if math.Float32bits(x)&0xffff != 0 {
			return false
		}
	}
	return true
}

// bf16Nearest is x rounded to the nearest bf16 (ties to even), widened back (finite x only).
func bf16Nearest(x float32) float32 {
	b := math.Float32bits(x)
	return math.Float32frombits((b + 0x7fff + (b>>16)&1) >> 16 << 16)
}

// A head storing bf16 trains, holds bf16 values, rounds SetCenters to nearest, and its checkpoint
// loads into bf16 and f32 heads of another shard count; it exports bf16 safetensors.
func TestBF16Storage(t *testing.T) {
	p := newProblem(5)
	cfg := testConfig(2)
	cfg.StorageDType = DTypeBF16
	h := newHead(t, cfg)
	grad := make([]float32, rows*dim)
	batches := split(p, grad)
	initial := allCenters(t, h)
	var first, last StepStats
	for i := 0; i < 6; i++ {
		s, err := h.TrainStep(batches...)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = s
		}
		last = s
	}
	trained := allCenters(t, h)
	if !(last.Loss < first.Loss) || equal(trained, initial) || !allBF16(trained) {
		t.Fatalf("loss %v → %v; centers moved %v; all bf16 %v", first.Loss, last.Loss, !equal(trained, initial), allBF16(trained))
	}
	values := make([]float32, 3*dim)
	for i := range values {
		values[i] = 0.1 + 1e-3*float32(i)
	}
	if err := h.SetCenters(5, values); err != nil {
		t.Fatal(err)
	}
	got, err := h.Centers(5, 3, false)
	if err != nil {
		t.Fatal(err)
	}
	rounded := false
	for i := range values {
		if got[i] != bf16Nearest(values[i]) {
			t.Fatalf("value %d: set %v, got %v, nearest bf16 %v", i, values[i], got[i], bf16Nearest(values[i]))
		}
		rounded = rounded || got[i] != values[i]
	}
	if !rounded {
		t.Fatal("no value needed rounding")
	}

	dir := filepath.Join(t.TempDir(), "ckpt")
	if err := h.Save(dir); err != nil {
		t.Fatal(err)
	}
	saved := allCenters(t, h)
	for _, storage := range []DType{DTypeBF16, DTypeF32} {
		one := cfg
		one.LocalShards = 1
		one.StorageDType = storage
		h1 := newHead(t, one)
		if err := h1.Load(dir); err != nil || !equal(saved, allCenters(t, h1)) {
			t.Fatalf("load into a one-shard head storing %d: %v", storage, err)
		}
	}

	st := filepath.Join(t.TempDir(), "c.safetensors")
	if err := h.Export(st, FormatSafetensors, DTypeBF16, false); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(st)
	if err != nil {
		t.Fatal(err)
	}
	header := int(uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24)
	if len(b) != 8+header+numClasses*dim*2 || !bytes.Contains(b[8:8+header], []byte(`"BF16"`)) {
		t.Fatalf("bf16 export of %d bytes, header %q", len(b), b[8:8+header])
	}
	for i, x := range saved {
		at := 8 + header + 2*i
		if uint16(b[at])|uint16(b[at+1])<<8 != uint16(math.Float32bits(x)>>16) {
			t.Fatalf("exported value %d is not the stored bf16 of %v", i, x)
		}
	}
	wantErr(t, h.Export(filepath.Join(t.TempDir(), "c.npy"), FormatNPY, DTypeBF16, false), StatusInvalidArgument, "pfc_export_centers", "numpy")
	f16 := cfg
	f16.StorageDType = DTypeF16
	_, err = New(f16)
	wantErr(t, err, StatusInvalidArgument, "pfc_create", "storage_dtype")
}

func mustWrite(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestSearchAndExport(t *testing.T) {
	p := newProblem(4)
	h := newHead(t, testConfig(2))
	if err := h.SetCenters(0, p.prototypes); err != nil {
		t.Fatal(err)
	}
	if !equal(allCenters(t, h), p.prototypes) {
		t.Fatal("SetCenters / Centers round trip")
	}
	const q = 12
	r, err := h.Search(p.emb[:q*dim], 4)
	if err != nil || r.N != q || r.K != 4 || len(r.IDs) != q*4 || len(r.Scores) != q*4 {
		t.Fatalf("Search = %+v, %v", r, err)
	}
	right := 0
	for i := 0; i < q; i++ {
		ids, scores := r.Hits(i)
		if ids[0] == p.labels[i] {
			right++
		}
		for j := 1; j < len(scores); j++ {
			if scores[j] > scores[j-1] {
				t.Fatalf("query %d: scores not sorted: %v", i, scores)
			}
		}
	}
	if right < q-1 {
		t.Fatalf("identified %d of %d", right, q)
	}
	unit, err := h.Centers(5, 2, true)
	if err != nil {
		t.Fatal(err)
	}
	var n2 float64
	for _, v := range unit[:dim] {
		n2 += float64(v) * float64(v)
	}
	if math.Abs(n2-1) > 1e-5 {
		t.Fatalf("normalized row has squared norm %v", n2)
	}

	dir := t.TempDir()
	npy := filepath.Join(dir, "centers.npy")
	if err := h.Export(npy, FormatNPY, DTypeF32, true); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(npy)
	if !bytes.HasPrefix(b, []byte("\x93NUMPY")) {
		t.Fatal("not an .npy file")
	}
	header := 10 + int(b[8]) + 256*int(b[9])
	if len(b) != header+numClasses*dim*4 {
		t.Fatalf(".npy has %d bytes", len(b))
	}
	fv := filepath.Join(dir, "centers.fvecs")
	if err := h.Export(fv, FormatFvecs, DTypeF32, false); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(fv); err != nil || st.Size() != numClasses*(4+dim*4) {
		t.Fatalf(".fvecs: %v, %v", st, err)
	}
	if err := h.Export(filepath.Join(dir, "c.safetensors"), FormatSafetensors, DTypeF16, false); err != nil {
		t.Fatal(err)
	}
	wantErr(t, h.Export(filepath.Join(dir, "c16.fvecs"), FormatFvecs, DTypeF16, false), StatusInvalidArgument, "pfc_export_centers", "fvecs")
	wantErr(t, h.Export(filepath.Join(dir, "no", "such", "dir.npy"), FormatNPY, DTypeF32, true), StatusIO, "pfc_export_centers", "")
}

func f16bits(f float32) uint16 { // normal range, round to nearest even
	x := math.Float32bits(f)
	sign := uint16(x>>16) & 0x8000
	e := int((x>>23)&0xff) - 127 + 15
	if e <= 0 {
		return sign
	}
	h := uint32(e)<<10 | (x&0x7fffff)>>13
	rem := x & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}

func TestHalf(t *testing.T) {
	p := newProblem(5)
	for _, shards := range []uint32{1, 2} {
		h := newHead(t, testConfig(shards))
		emb := make([]uint16, len(p.emb))
		for i, v := range p.emb {
			emb[i] = f16bits(v)
		}
		grad := make([]uint16, len(emb))
		batches := []HalfBatch{{Embeddings: emb, Labels: p.labels, Grad: grad}}
		if shards == 2 {
			batches = []HalfBatch{{Embeddings: emb[:20*dim], Labels: p.labels[:20], Grad: grad[:20*dim]},
				{Embeddings: emb[20*dim:], Labels: p.labels[20:], Grad: grad[20*dim:]}}
		}
		first, err := h.TrainStepHalf(DTypeF16, batches...)
		if err != nil {
			t.Fatal(err)
		}
		last := first
		for i := 0; i < 5; i++ {
			if last, err = h.TrainStepHalf(DTypeF16, batches...); err != nil {
				t.Fatal(err)
			}
		}
		if !(last.Loss < first.Loss) {
			t.Fatalf("f16 loss %v -> %v", first.Loss, last.Loss)
		}
		nonzero := false
		for _, g := range grad {
			nonzero = nonzero || g&0x7fff != 0
		}
		if !nonzero {
			t.Fatalf("%d shards: no f16 gradient written", shards)
		}
		if _, err := h.EvaluateHalf(DTypeBF16, batches...); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCloseTwiceAndUseAfterClose(t *testing.T) {
	p := newProblem(6)
	h, err := New(testConfig(1))
	if err != nil {
		t.Fatal(err)
	}
	grad := make([]float32, rows*dim)
	b := Batch{Embeddings: p.emb, Labels: p.labels, Grad: grad}
	if _, err := h.TrainStep(b); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	closed := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("%s after Close: %v, want ErrClosed", what, err)
		}
	}
	_, err = h.TrainStep(b)
	closed("TrainStep", err)
	_, err = h.Evaluate(b)
	closed("Evaluate", err)
	_, err = h.TrainStepHalf(DTypeF16, HalfBatch{})
	closed("TrainStepHalf", err)
	closed("SetLearningRate", h.SetLearningRate(0.1))
	_, _, err = h.LocalClasses()
	closed("LocalClasses", err)
	_, err = h.Centers(0, 1, false)
	closed("Centers", err)
	closed("SetCenters", h.SetCenters(0, p.prototypes[:dim]))
	_, err = h.Search(p.emb[:dim], 1)
	closed("Search", err)
	closed("Save", h.Save(t.TempDir()))
	closed("Load", h.Load(t.TempDir()))
	err = h.Export(filepath.Join(t.TempDir(), "c.npy"), FormatNPY, DTypeF32, true)
	closed("Export", err)
	if !strings.Contains(err.Error(), "pfc_export_centers") {
		t.Fatalf("closed error names no function: %v", err)
	}

	var nilHead *Head
	_, err = nilHead.TrainStep(b)
	closed("TrainStep on a nil *Head", err)
	if err := nilHead.Close(); err != nil {
		t.Fatal(err)
	}
}

// Close waits for calls in flight; calls after it see ErrClosed, never a freed head.
func TestCloseWhileTraining(t *testing.T) {
	p := newProblem(7)
	h, err := New(testConfig(2))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var steps int64
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			grad := make([]float32, rows*dim)
			for {
				_, err := h.TrainStep(split(p, grad)...)
				if errors.Is(err, ErrClosed) {
					return
				}
				if err != nil {
					t.Errorf("TrainStep: %v", err)
					return
				}
				atomic.AddInt64(&steps, 1)
			}
		}()
	}
	for atomic.LoadInt64(&steps) < 8 {
		time.Sleep(time.Millisecond)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// Each goroutine's error carries its own message, though goroutines share OS threads.
func TestErrorsPerGoroutine(t *testing.T) {
	p := newProblem(8)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			h, err := New(testConfig(1))
			if err != nil {
				t.Error(err)
				return
			}
			defer h.Close()
			emb := append([]float32(nil), p.emb...)
			labels := append([]int64(nil), p.labels...)
			grad := make([]float32, len(emb))
			want := "label"
			if g%2 == 0 {
				emb[0] = float32(math.Inf(-1))
				want = "NaN"
			} else {
				labels[0] = numClasses + int64(g)
			}
			for i := 0; i < 50; i++ {
				_, err := h.TrainStep(Batch{Embeddings: emb, Labels: labels, Grad: grad})
				var e *Error
				if !errors.As(err, &e) || !strings.Contains(e.Message, want) {
					t.Errorf("goroutine %d: got %v, want a message about %s", g, err, want)
					return
				}
				if _, err := h.Evaluate(Batch{Embeddings: p.emb, Labels: p.labels}); err != nil {
					t.Errorf("goroutine %d: %v", g, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
}

// A head that is never closed is freed by its finalizer.
func TestFinalizer(t *testing.T) {
	before := atomic.LoadInt64(&finalized)
	func() {
		for i := 0; i < 3; i++ {
			if _, err := New(testConfig(1)); err != nil {
				t.Fatal(err)
			}
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for atomic.LoadInt64(&finalized) < before+3 {
		if time.Now().After(deadline) {
			t.Fatalf("finalizer freed %d of 3 heads", atomic.LoadInt64(&finalized)-before)
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	// A closed head's finalizer is cleared: closing then collecting frees nothing twice.
	h, err := New(testConfig(1))
	if err != nil {
		t.Fatal(err)
	}
	_ = h.Close()
	h = nil
	runtime.GC()
	runtime.GC()
	_ = h
}
