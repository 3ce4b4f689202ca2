// Command identify answers closed-set identification queries with partialfc's top-k search over
// trained class centers: a search-only index (partialfc.OpenIndex, no training head and no
// optimizer state) over an exported file (pfc_export_centers: .npy, .fvecs, .safetensors or a FAISS
// IndexFlatIP, f32 or f16) or a checkpoint directory (pfc_save_checkpoint).
//
//	go build                           # against an installed partialfc, found by pkg-config
//	go build -tags partialfc_repo      # inside the repository: this checkout's target/release
//	./identify [-k 5] [-queries queries.txt] [-quiet] [-timeout 30s] <centers file | checkpoint/>
//
// Queries are read one per line (from -queries or stdin): the embedding's values separated by
// spaces, optionally preceded by "id=<class>" — then the top-1 and top-k identification rates are
// reported too. examples/cpp/train.cpp writes such a file beside its centers and checkpoint
// (pfc-out/cpp/ by default). Interrupting it (Ctrl-C) or -timeout stops the search between chunks
// of queries.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"

	"github.com/partialfc/partialfc/bindings/go/partialfc"
)

func main() {
	k := flag.Int("k", 5, "classes reported per query")
	queriesPath := flag.String("queries", "", "query file (default: standard input)")
	quiet := flag.Bool("quiet", false, "print only the summary")
	timeout := flag.Duration("timeout", 0, "give up the search after this long (0: no limit)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: identify [flags] <centers.npy|.fvecs|.safetensors|.faiss | checkpoint dir>\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	if err := run(ctx, flag.Arg(0), *queriesPath, *k, *quiet); err != nil {
		fmt.Fprintln(os.Stderr, "identify:", err)
		var pe *partialfc.Error
		if errors.As(err, &pe) {
			fmt.Fprintf(os.Stderr, "identify: status %v from %s\n", pe.Status, pe.Op)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, source, queriesPath string, k int, quiet bool) error {
	index, err := partialfc.OpenIndex(source)
	if err != nil {
		return err
	}
	defer index.Close()
	classes := index.NumClasses()
	fmt.Printf("partialfc %s: %d classes of dimension %d from %s\n", partialfc.Version(), classes, index.EmbeddingDim(), source)

	in := io.Reader(os.Stdin)
	if queriesPath != "" {
		f, err := os.Open(queriesPath)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	queries, ids, err := readQueries(in, index.EmbeddingDim())
	if err != nil {
		return err
	}
	if len(ids) == 0 {
		return errors.New("no queries")
	}
	if uint64(k) > classes {
		k = int(classes)
	}
	res, err := index.Search(ctx, queries, k)
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
