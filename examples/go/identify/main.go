// Command identify answers closed-set identification queries with partialfc's top-k search over
// trained class centers, loaded either from an exported file (pfc_export_centers: .npy, .fvecs or
// .safetensors, f32 or f16) or from a checkpoint directory (pfc_save_checkpoint).
//
//	cd examples/go/identify && go build        # add -tags partialfc_static to link libpartialfc.a
//	./identify [-k 5] [-queries queries.txt] [-quiet] <centers.npy | centers.fvecs | centers.safetensors | checkpoint/>
//
// Queries are read one per line (from -queries or stdin): the embedding's values separated by
// spaces, optionally preceded by "id=<class>" — then the top-1 and top-k identification rates are
// reported too. examples/cpp/train.cpp writes such a file beside its centers and checkpoint.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"partialfc.dev/bindings/go/partialfc"
)

// Rows handed to SetCenters at a time: the whole matrix is never held in Go memory.
const chunkRows = 4096

func main() {
	k := flag.Int("k", 5, "classes reported per query")
	queriesPath := flag.String("queries", "", "query file (default: standard input)")
	quiet := flag.Bool("quiet", false, "print only the summary")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: identify [flags] <centers.npy|.fvecs|.safetensors | checkpoint dir>\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *queriesPath, *k, *quiet); err != nil {
		fmt.Fprintln(os.Stderr, "identify:", err)
		var pe *partialfc.Error
		if errors.As(err, &pe) {
			fmt.Fprintf(os.Stderr, "identify: status %v from %s\n", pe.Status, pe.Op)
		}
		os.Exit(1)
	}
}

func run(source, queriesPath string, k int, quiet bool) error {
	head, err := open(source)
	if err != nil {
		return err
	}
	defer head.Close()
	_, classes, err := head.LocalClasses()
	if err != nil {
		return err
	}
	fmt.Printf("partialfc %s: %d classes of dimension %d from %s\n", partialfc.Version(), classes, head.EmbeddingDim(), source)

	in := io.Reader(os.Stdin)
	if queriesPath != "" {
		f, err := os.Open(queriesPath)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	queries, ids, err := readQueries(in, head.EmbeddingDim())
	if err != nil {
		return err
	}
	if len(ids) == 0 {
		return errors.New("no queries")
	}
	if uint64(k) > classes {
		k = int(classes)
	}
	res, err := head.Search(queries, k)
	if err != nil {
		return err
	}
	top1, topk, labelled := 0, 0, 0
	for q := 0; q < res.N; q++ {
		hits, scores := res.Hits(q)
		if !quiet {
			var b strings.Builder
			fmt.Fprintf(&b, "query %d:", q)
			for j := range hits {
				fmt.Fprintf(&b, " %d (%.3f)", hits[j], scores[j])
			}
			if ids[q] >= 0 {
				fmt.Fprintf(&b, "  [true id %d]", ids[q])
			}
			fmt.Println(b.String())
		}
		if ids[q] < 0 {
			continue
		}
		labelled++
		if hits[0] == ids[q] {
			top1++
		}
		for _, h := range hits {
			if h == ids[q] {
				topk++
			}
		}
	}
	fmt.Printf("%d queries", res.N)
	if labelled > 0 {
		fmt.Printf("; identification over %d labelled: top-1 %.3f, top-%d %.3f", labelled,
			float64(top1)/float64(labelled), k, float64(topk)/float64(labelled))
	}
	fmt.Println()
	return nil
}

// open builds a head holding the centers of a checkpoint directory or an exported file.
func open(source string) (*partialfc.Head, error) {
	st, err := os.Stat(source)
	if err != nil {
		return nil, err
	}
	if st.IsDir() {
		return openCheckpoint(source)
	}
	f, err := os.Open(source)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	switch strings.ToLower(filepath.Ext(source)) {
	case ".npy":
		return loadNPY(r)
	case ".fvecs":
		return loadFvecs(r, st.Size())
	case ".safetensors":
		return loadSafetensors(r)
	}
	return nil, fmt.Errorf("%s: expected a checkpoint directory or a .npy, .fvecs or .safetensors file", source)
}

// openCheckpoint reads the manifest's shape and optimizer, then lets the library load and verify it.
func openCheckpoint(dir string) (*partialfc.Head, error) {
	text, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var file struct {
		Manifest struct {
			NumClasses   uint64 `json:"num_classes"`
			EmbeddingDim uint32 `json:"embedding_dim"`
			Optimizer    string `json:"optimizer"`
		} `json:"manifest"`
	}
	if err := json.Unmarshal(text, &file); err != nil {
		return nil, fmt.Errorf("%s/manifest.json: %w", dir, err)
	}
	m := file.Manifest
	cfg := partialfc.DefaultConfig()
	cfg.NumClasses, cfg.EmbeddingDim = m.NumClasses, m.EmbeddingDim
	if m.Optimizer == "adamw" {
		cfg.Optimizer = partialfc.OptimizerAdamW
	}
	head, err := partialfc.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := head.Load(dir); err != nil {
		head.Close()
		return nil, err
	}
	return head, nil
}

func newHead(classes uint64, dim int) (*partialfc.Head, error) {
	if classes == 0 || dim <= 0 {
		return nil, fmt.Errorf("no centers (%d × %d)", classes, dim)
	}
	cfg := partialfc.DefaultConfig()
	cfg.NumClasses, cfg.EmbeddingDim = classes, uint32(dim)
	return partialfc.New(cfg)
}

// fill streams rows of `elem`-byte values (f32 or f16, little-endian) from r into the head.
func fill(head *partialfc.Head, r io.Reader, classes uint64, dim, elem int, rowPrefix int) error {
	buf := make([]byte, chunkRows*(rowPrefix+dim*elem))
	vals := make([]float32, chunkRows*dim)
	for first := uint64(0); first < classes; first += chunkRows {
		n := classes - first
		if n > chunkRows {
			n = chunkRows
		}
		rowBytes := rowPrefix + dim*elem
		b := buf[:int(n)*rowBytes]
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("reading rows from %d: %w", first, err)
		}
		for i := 0; i < int(n); i++ {
			row := b[i*rowBytes+rowPrefix : (i+1)*rowBytes]
			for j := 0; j < dim; j++ {
				if elem == 4 {
					vals[i*dim+j] = math.Float32frombits(binary.LittleEndian.Uint32(row[4*j:]))
				} else {
					vals[i*dim+j] = f16ToF32(binary.LittleEndian.Uint16(row[2*j:]))
				}
			}
		}
		if err := head.SetCenters(first, vals[:int(n)*dim]); err != nil {
			return err
		}
	}
	return nil
}

func withCenters(classes uint64, dim, elem, prefix int, r io.Reader) (*partialfc.Head, error) {
	head, err := newHead(classes, dim)
	if err != nil {
		return nil, err
	}
	if err := fill(head, r, classes, dim, elem, prefix); err != nil {
		head.Close()
		return nil, err
	}
	return head, nil
}

var npyShape = regexp.MustCompile(`'shape':\s*\((\d+),\s*(\d+)\)`)

func loadNPY(r io.Reader) (*partialfc.Head, error) {
	magic := make([]byte, 8)
	if _, err := io.ReadFull(r, magic); err != nil || string(magic[:6]) != "\x93NUMPY" {
		return nil, errors.New("not an .npy file")
	}
	var hlen int
	if magic[6] == 1 {
		var n uint16
		if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
			return nil, err
		}
		hlen = int(n)
	} else {
		var n uint32
		if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
			return nil, err
		}
		hlen = int(n)
	}
	header := make([]byte, hlen)
	if _, err := io.ReadFull(r, header); err != nil {
		return nil, err
	}
	h := string(header)
	elem := 0
	switch {
	case strings.Contains(h, "'<f4'"):
		elem = 4
	case strings.Contains(h, "'<f2'"):
		elem = 2
	default:
		return nil, fmt.Errorf(".npy dtype not f32 or f16: %s", h)
	}
	if strings.Contains(h, "'fortran_order': True") {
		return nil, errors.New(".npy in Fortran order")
	}
	m := npyShape.FindStringSubmatch(h)
	if m == nil {
		return nil, fmt.Errorf(".npy shape is not 2-D: %s", h)
	}
	classes, _ := strconv.ParseUint(m[1], 10, 64)
	dim, _ := strconv.Atoi(m[2])
	return withCenters(classes, dim, elem, 0, r)
}

// loadFvecs reads FAISS .fvecs: each row is an int32 dimension then that many f32 values.
func loadFvecs(r *bufio.Reader, size int64) (*partialfc.Head, error) {
	b, err := r.Peek(4)
	if err != nil {
		return nil, err
	}
	dim := int(int32(binary.LittleEndian.Uint32(b)))
	if dim <= 0 || size%int64(4+4*dim) != 0 {
		return nil, fmt.Errorf(".fvecs: dimension %d does not divide %d bytes", dim, size)
	}
	return withCenters(uint64(size/int64(4+4*dim)), dim, 4, 4, r)
}

func loadSafetensors(r io.Reader) (*partialfc.Head, error) {
	var n uint64
	if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
		return nil, err
	}
	if n > 100<<20 {
		return nil, fmt.Errorf("safetensors header of %d bytes", n)
	}
	header := make([]byte, n)
	if _, err := io.ReadFull(r, header); err != nil {
		return nil, err
	}
	var tensors map[string]json.RawMessage
	if err := json.Unmarshal(header, &tensors); err != nil {
		return nil, err
	}
	var t struct {
		DType   string   `json:"dtype"`
		Shape   []uint64 `json:"shape"`
		Offsets []uint64 `json:"data_offsets"`
	}
	raw, ok := tensors["centers"]
	if !ok {
		return nil, errors.New("safetensors file has no \"centers\" tensor")
	}
	if err := json.Unmarshal(raw, &t); err != nil {
		return nil, err
	}
	elem := map[string]int{"F32": 4, "F16": 2}[t.DType]
	if elem == 0 || len(t.Shape) != 2 || len(t.Offsets) != 2 {
		return nil, fmt.Errorf("centers: dtype %s shape %v: expected F32 or F16 [C, d]", t.DType, t.Shape)
	}
	if _, err := io.CopyN(io.Discard, r, int64(t.Offsets[0])); err != nil {
		return nil, err
	}
	return withCenters(t.Shape[0], int(t.Shape[1]), elem, 0, r)
}

func f16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0:
		v := float32(mant) / (1 << 24)
		if sign != 0 {
			return -v
		}
		return v
	case exp == 31:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
}

// readQueries parses lines of `[id=<class>] v1 … vd`; ids are -1 where absent.
func readQueries(r io.Reader, dim int) ([]float32, []int64, error) {
	var values []float32
	var ids []int64
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<26)
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		id := int64(-1)
		if strings.HasPrefix(fields[0], "id=") {
			v, err := strconv.ParseInt(strings.TrimPrefix(fields[0], "id="), 10, 64)
			if err != nil {
				return nil, nil, fmt.Errorf("line %d: %w", line, err)
			}
			id, fields = v, fields[1:]
		}
		if len(fields) != dim {
			return nil, nil, fmt.Errorf("line %d: %d values, expected %d", line, len(fields), dim)
		}
		for _, f := range fields {
			v, err := strconv.ParseFloat(f, 32)
			if err != nil {
				return nil, nil, fmt.Errorf("line %d: %w", line, err)
			}
			values = append(values, float32(v))
		}
		ids = append(ids, id)
	}
	return values, ids, sc.Err()
}
