package main

import (
	"bytes"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Direction of a target.
const (
	noTarget = 0
	atLeast  = 1 // met when value >= target
	atMost   = -1
)

// figure is one line of the results table.
type figure struct {
	ID     string  // measurement number from the issue, e.g. "2"
	Name   string  // what was measured
	Short  string  // label in the plot
	Value  float64 // NaN when not measured
	Unit   string  // shown after the value: "", "ms", "MiB", ...
	Digits int     // decimals shown
	Target float64
	Dir    int    // atLeast, atMost or noTarget
	Err    string // why it was not measured
}

func (f figure) label() string {
	if f.Short != "" {
		return f.Short
	}
	return f.Name
}

func (f figure) measured() bool { return f.Err == "" && !math.IsNaN(f.Value) }

func (f figure) met() bool {
	switch f.Dir {
	case atLeast:
		return f.Value >= f.Target
	case atMost:
		return f.Value <= f.Target
	}
	return true
}

func (f figure) valueText() string {
	if !f.measured() {
		return "not measured"
	}
	return withUnit(fmt.Sprintf("%.*f", f.Digits, f.Value), f.Unit)
}

func (f figure) targetText() string {
	switch f.Dir {
	case atLeast:
		return "≥ " + withUnit(trimNum(f.Target), f.Unit)
	case atMost:
		return "≤ " + withUnit(trimNum(f.Target), f.Unit)
	}
	return "—"
}

func (f figure) statusText() string {
	switch {
	case !f.measured():
		return "FAILED"
	case f.Dir == noTarget:
		return "(info)"
	case f.met():
		return "met"
	}
	return "MISSED"
}

func withUnit(v, unit string) string {
	if unit == "" {
		return v
	}
	return v + " " + unit
}

func trimNum(v float64) string {
	s := fmt.Sprintf("%.3f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

// printTable writes the table in plain text, aligned.
func printTable(w io.Writer, figs []figure) {
	rows := [][]string{{"#", "figure", "value", "target", "status"}}
	for _, f := range figs {
		rows = append(rows, []string{f.ID, f.Name, f.valueText(), f.targetText(), f.statusText()})
	}
	widths := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r {
			widths[i] = max(widths[i], len([]rune(c)))
		}
	}
	for j, r := range rows {
		var b strings.Builder
		for i, c := range r {
			b.WriteString(c)
			if i < len(r)-1 {
				b.WriteString(strings.Repeat(" ", widths[i]-len([]rune(c))+2))
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
		if j == 0 {
			total := 0
			for _, wd := range widths {
				total += wd + 2
			}
			fmt.Fprintln(w, strings.Repeat("-", total-2))
		}
	}
	for _, f := range failures(figs) {
		fmt.Fprintf(w, "  measurement %s failed: %s\n", f.ID, f.Err)
	}
}

// markdownTable writes the table in Markdown.
func markdownTable(w io.Writer, figs []figure) {
	fmt.Fprintln(w, "| # | figure | value | target | status |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, f := range figs {
		status := f.statusText()
		if status == "MISSED" || status == "FAILED" {
			status = "**" + status + "**"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", f.ID, mdEscape(f.Name), f.valueText(), f.targetText(), status)
	}
	for _, f := range failures(figs) {
		fmt.Fprintf(w, "\nMeasurement %s failed: %s\n", f.ID, mdEscape(f.Err))
	}
}

// failures returns one failed figure per distinct measurement and error.
func failures(figs []figure) []figure {
	var out []figure
	seen := map[string]bool{}
	for _, f := range figs {
		if k := f.ID + "\x00" + f.Err; f.Err != "" && !seen[k] {
			seen[k] = true
			out = append(out, f)
		}
	}
	return out
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

// writeSVG draws one bullet bar per figure that has a target: the bar is the
// measured value, the black line the target, each row on its own scale
// from zero. Green bars met their target, red ones missed it.
func writeSVG(w io.Writer, title, subtitle string, figs []figure) {
	var rows []figure
	for _, f := range figs {
		if f.Dir != noTarget {
			rows = append(rows, f)
		}
	}
	const (
		width   = 960
		labelW  = 330
		barX    = labelW + 10
		barW    = 400
		rowH    = 46
		top     = 78
		barH    = 18
		fontCSS = "font-family:DejaVu Sans,Verdana,Arial,sans-serif"
	)
	height := top + rowH*len(rows) + 40
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" style="%s">`+"\n",
		width, height, width, height, fontCSS)
	fmt.Fprintf(w, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", width, height)
	fmt.Fprintf(w, `<text x="16" y="28" font-size="18" font-weight="bold">%s</text>`+"\n", html.EscapeString(title))
	fmt.Fprintf(w, `<text x="16" y="50" font-size="12" fill="#555">%s</text>`+"\n", html.EscapeString(subtitle))
	fmt.Fprintf(w, `<text x="16" y="68" font-size="12" fill="#555">%s</text>`+"\n",
		html.EscapeString("Each bar is a measured value on its own scale from 0; the black line is its target. Green: met. Red: missed."))
	for i, f := range rows {
		y := top + i*rowH
		cy := y + rowH/2
		fmt.Fprintf(w, `<text x="16" y="%d" font-size="13">%s</text>`+"\n", cy+5, html.EscapeString(f.ID+"  "+f.label()))
		scale := f.Target * 1.25
		if f.measured() && f.Value*1.1 > scale {
			scale = f.Value * 1.1
		}
		if scale <= 0 {
			scale = 1
		}
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="%d" height="%d" fill="#eeeeee"/>`+"\n", barX, cy-barH/2, barW, barH)
		label := f.valueText()
		if f.measured() {
			color := "#2e9d49"
			if !f.met() {
				color = "#d43d3d"
			}
			bw := math.Max(0, f.Value) / scale * barW
			fmt.Fprintf(w, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", barX, cy-barH/2, bw, barH, color)
		}
		tx := float64(barX) + f.Target/scale*barW
		fmt.Fprintf(w, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000" stroke-width="2.5"/>`+"\n", tx, cy-barH/2-5, tx, cy+barH/2+5)
		fmt.Fprintf(w, `<text x="%.1f" y="%d" font-size="10" text-anchor="middle" fill="#333">%s</text>`+"\n",
			tx, cy-barH/2-7, html.EscapeString(f.targetText()))
		fmt.Fprintf(w, `<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>`+"\n",
			barX+barW+12, cy+5, html.EscapeString(label+"  "+f.statusText()))
	}
	fmt.Fprintln(w, `</svg>`)
}

// writeResults writes results.md and results.svg into the folder -out
// names; by default, only a full run writes into the repository, and a
// partial one into a temporary folder.
func (b *bench) writeResults(opts options, elapsed time.Duration) error {
	dir := opts.out
	switch {
	case dir != "":
	case opts.quick || len(opts.only) > 0:
		var err error
		if dir, err = os.MkdirTemp("", "smtppool-bench-quick-"); err != nil {
			return err
		}
	default:
		dir = filepath.Join(b.root, "e2e", "bench")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md bytes.Buffer
	b.writeMarkdown(&md, elapsed, opts)
	if err := os.WriteFile(filepath.Join(dir, "results.md"), md.Bytes(), 0o644); err != nil {
		return err
	}
	var svg bytes.Buffer
	writeSVG(&svg, "smtppool benchmark: each figure against its target",
		fmt.Sprintf("go run ./e2e/bench, %s, %s", b.start.UTC().Format("2006-01-02"), machineSummary()), b.figs)
	if err := os.WriteFile(filepath.Join(dir, "results.svg"), svg.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s and %s\n", filepath.Join(dir, "results.md"), filepath.Join(dir, "results.svg"))
	return nil
}

// writeMarkdown writes the report: the table, then how each figure was
// measured.
func (b *bench) writeMarkdown(md io.Writer, elapsed time.Duration, opts options) {
	kind := "full run"
	if opts.quick {
		kind = "quick smoke run (-quick): small samples, not for publishing"
	}
	if len(opts.only) > 0 {
		ids := make([]string, 0, len(opts.only))
		for id := range opts.only {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		kind += ", only measurements " + strings.Join(ids, ",")
	}
	fmt.Fprintf(md, "<!-- written by go run ./e2e/bench; do not edit -->\n")
	fmt.Fprintf(md, "Results of `go run ./e2e/bench` (%s), %s, run time %v.\n\n", kind, b.start.UTC().Format("2006-01-02 15:04 MST"), elapsed)
	markdownTable(md, b.figs)
	fmt.Fprintf(md, "\n![Each figure against its target](results.svg)\n")
	fmt.Fprintf(md, "\nEvery ratio and difference was measured side by side in this one run, on loopback, with real peers (Postfix's smtp-sink and smtp-source, and Postfix itself).\n\n")
	fmt.Fprintf(md, "#### How each figure was measured\n\n")
	// A detail line that starts with its measurement's number.
	numbered := regexp.MustCompile(`^(\d+[a-c]?)\. (.*)$`)
	for _, d := range b.details {
		switch m := numbered.FindStringSubmatch(d); {
		case strings.HasPrefix(d, "   "):
			fmt.Fprintf(md, "  - %s\n", strings.TrimSpace(d))
		case m != nil:
			fmt.Fprintf(md, "- **%s.** %s\n", m[1], m[2])
		default:
			fmt.Fprintf(md, "- %s\n", d)
		}
	}
}

func machineSummary() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d cores (%s), Linux %s, %s", runtime.NumCPU(), model, strings.TrimSpace(string(kernel)), runtime.Version())
}

func gitDescribe(root string) string {
	out, err := exec.Command("git", "-C", root, "describe", "--always", "--dirty").Output()
	if err != nil {
		return "(not a git checkout)"
	}
	return "commit " + strings.TrimSpace(string(out))
}

func postfixVersion() string {
	out, err := exec.Command("postconf", "-d", "-h", "mail_version").Output()
	if err != nil {
		return "Postfix (version unknown)"
	}
	return "Postfix " + strings.TrimSpace(string(out))
}
