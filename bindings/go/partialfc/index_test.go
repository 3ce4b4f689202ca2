package partialfc

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// trainedHead is a head whose centers are the problem's prototypes, after a few training steps
// (so the optimizer state is not empty).
func trainedHead(t *testing.T, p problem) *Head {
	t.Helper()
	h := newHead(t, testConfig(2))
	if err := h.SetCenters(0, p.prototypes); err != nil {
		t.Fatal(err)
	}
	grad := make([]float32, len(p.emb))
	for i := 0; i < 3; i++ {
		if _, err := h.TrainStep(split(p, grad)...); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func openIndex(t *testing.T, path string) *Index {
	t.Helper()
	ix, err := OpenIndex(path)
	if err != nil {
		t.Fatalf("OpenIndex(%s): %v", path, err)
	}
	t.Cleanup(func() { _ = ix.Close() })
	return ix
}

func sameResult(a, b SearchResult) bool {
	if a.N != b.N || a.K != b.K || len(a.IDs) != len(b.IDs) {
		return false
	}
	for i := range a.IDs {
		if a.IDs[i] != b.IDs[i] || a.Scores[i] != b.Scores[i] {
			return false
		}
	}
	return true
}

// An index over any export (f32) or the checkpoint answers exactly as the head's Search does.
func TestIndexSearchesAsTheHead(t *testing.T) {
	p := newProblem(21)
	h := trainedHead(t, p)
	dir := t.TempDir()
	want, err := h.Search(p.emb, 5)
	if err != nil {
		t.Fatal(err)
	}
	sources := map[string]func(string) error{
		"centers.safetensors": func(path string) error { return h.Export(path, FormatSafetensors, DTypeF32, false) },
		"centers.npy":         func(path string) error { return h.Export(path, FormatNPY, DTypeF32, false) },
		"centers.fvecs":       func(path string) error { return h.Export(path, FormatFvecs, DTypeF32, false) },
		"centers.faiss":       func(path string) error { return h.Export(path, FormatFAISS, DTypeF32, false) },
		"checkpoint":          h.Save,
	}
	for name, write := range sources {
		path := filepath.Join(dir, name)
		if err := write(path); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		ix := openIndex(t, path)
		if ix.NumClasses() != numClasses || ix.EmbeddingDim() != dim {
			t.Fatalf("%s: %d classes of dimension %d", name, ix.NumClasses(), ix.EmbeddingDim())
		}
		got, err := ix.Search(context.Background(), p.emb, 5)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !sameResult(got, want) {
			t.Fatalf("%s: index results differ from the head's:\n%+v\n%+v", name, got, want)
		}
	}
	// Rows normalized at export give the same classes; the cosines differ by rounding only.
	path := filepath.Join(dir, "unit.faiss")
	if err := h.Export(path, FormatFAISS, DTypeF32, true); err != nil {
		t.Fatal(err)
	}
	got, err := openIndex(t, path).Search(context.Background(), p.emb, 5)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want.IDs {
		if d := got.Scores[i] - want.Scores[i]; got.IDs[i] != want.IDs[i] || d > 1e-5 || d < -1e-5 {
			t.Fatalf("normalized FAISS export, hit %d: class %d (%g), head: %d (%g)", i, got.IDs[i], got.Scores[i], want.IDs[i], want.Scores[i])
		}
	}
}

// More queries than one chunk: the chunks are stitched into one result, in query order.
func TestIndexSearchOverManyChunks(t *testing.T) {
	p := newProblem(22)
	h := trainedHead(t, p)
	path := filepath.Join(t.TempDir(), "centers.npy")
	if err := h.Export(path, FormatNPY, DTypeF32, false); err != nil {
		t.Fatal(err)
	}
	ix := openIndex(t, path)
	n := 2*SearchChunkRows + 7
	queries := make([]float32, 0, n*dim)
	for len(queries) < n*dim {
		queries = append(queries, p.emb...)
	}
	queries = queries[:n*dim]
	got, err := ix.Search(context.Background(), queries, 3)
	if err != nil {
		t.Fatal(err)
	}
	want, err := h.Search(queries, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !sameResult(got, want) {
		t.Fatal("chunked search differs from one call")
	}
	hc, err := h.SearchContext(context.Background(), queries, 3)
	if err != nil || !sameResult(hc, want) {
		t.Fatalf("Head.SearchContext differs: %v", err)
	}
}

func TestIndexSearchStopsWhenCancelled(t *testing.T) {
	p := newProblem(23)
	h := trainedHead(t, p)
	path := filepath.Join(t.TempDir(), "centers.safetensors")
	if err := h.Export(path, FormatSafetensors, DTypeF16, false); err != nil {
		t.Fatal(err)
	}
	ix := openIndex(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if r, err := ix.Search(ctx, p.emb, 2); !errors.Is(err, context.Canceled) || r.IDs != nil {
		t.Fatalf("cancelled Search = %+v, %v; want context.Canceled", r, err)
	}
	if _, err := h.SearchContext(ctx, p.emb, 2); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Head.SearchContext: %v", err)
	}
}

func TestIndexErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := OpenIndex(filepath.Join(dir, "missing.npy"))
	wantErr(t, err, StatusIO, "pfc_index_open", "missing.npy")
	junk := filepath.Join(dir, "junk.npy")
	if err := os.WriteFile(junk, []byte("\x93NUMPY not really"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenIndex(junk); !errors.Is(err, StatusCorrupt) {
		t.Fatalf("junk file: %v, want StatusCorrupt", err)
	}
	if _, err := OpenIndex("a\x00b"); !errors.Is(err, StatusInvalidArgument) {
		t.Fatalf("NUL in path: %v", err)
	}

	p := newProblem(24)
	h := trainedHead(t, p)
	path := filepath.Join(dir, "centers.fvecs")
	if err := h.Export(path, FormatFvecs, DTypeF32, false); err != nil {
		t.Fatal(err)
	}
	ix := openIndex(t, path)
	if _, err := ix.Search(context.Background(), p.emb[:dim+1], 1); !errors.Is(err, StatusInvalidArgument) {
		t.Fatalf("partial row: %v", err)
	}
	if _, err := ix.Search(context.Background(), p.emb, numClasses+1); !errors.Is(err, StatusInvalidArgument) {
		t.Fatalf("k beyond the classes: %v", err)
	}
	if _, err := ix.Search(context.Background(), p.emb, 0); err == nil {
		t.Fatal("k = 0 accepted")
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ix.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	if _, err := ix.Search(context.Background(), p.emb, 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("Search after Close: %v, want ErrClosed", err)
	}
}

// One index, many goroutines searching at once (the C index is immutable and shared).
func TestIndexConcurrentSearches(t *testing.T) {
	p := newProblem(25)
	h := trainedHead(t, p)
	path := filepath.Join(t.TempDir(), "centers.npy")
	if err := h.Export(path, FormatNPY, DTypeF32, false); err != nil {
		t.Fatal(err)
	}
	ix := openIndex(t, path)
	want, err := ix.Search(context.Background(), p.emb, 4)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				got, err := ix.Search(context.Background(), p.emb, 4)
				if err != nil {
					errs <- err
					return
				}
				if !sameResult(got, want) {
					errs <- errors.New("a concurrent search gave different results")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
