package main

// smtppool's admin endpoint: its address, from the log, and its metrics.

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/smtppool/smtppool/e2e/internal/peers"
)

// adminAddrRE finds the admin address in smtppool's JSON log.
var adminAddrRE = regexp.MustCompile(`"msg":"admin endpoints listening","addr":"([^"]+)"`)

// adminAddr waits until smtppool has logged where its admin endpoints
// listen, and returns that address.
func adminAddr(ctx context.Context, p *peers.Proxy) (string, error) {
	var addr string
	err := peers.Poll(ctx, 15*time.Second, "smtppool's admin address in its log", func() (bool, string) {
		if m := adminAddrRE.FindStringSubmatch(p.Log()); m != nil {
			addr = m[1]
			return true, ""
		}
		return p.Exited(), "not logged yet"
	})
	if p.Exited() {
		return "", p.Failure()
	}
	return addr, err
}

// metrics is one scrape of /metrics: each series, "name{labels}", with its
// value.
type metrics map[string]float64

// scraper reads smtppool's /metrics without keeping a connection open, so
// that it adds no goroutine to smtppool between scrapes.
type scraper struct {
	url    string
	client *http.Client
}

func newScraper(addr string) *scraper {
	return &scraper{url: "http://" + addr + "/metrics",
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}}
}

// scrape reads every series of the Prometheus text format.
func (s *scraper) scrape(ctx context.Context) (metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape smtppool's metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape smtppool's metrics: %s", resp.Status)
	}
	m := metrics{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// get returns the series name with no labels.
func (m metrics) get(name string) float64 { return m[name] }

// byLabel returns the series of name by the value of label.
func (m metrics) byLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	re := regexp.MustCompile(`[{,]` + label + `="([^"]*)"`)
	for series, v := range m {
		if !strings.HasPrefix(series, name+"{") {
			continue
		}
		if sub := re.FindStringSubmatch(series); sub != nil {
			out[sub[1]] += v
		}
	}
	return out
}

// usage is smtppool's resident memory and goroutines at one moment.
type usage struct {
	rss        float64 // bytes
	goroutines float64
}

func (m metrics) usage() usage {
	return usage{rss: m.get("process_resident_memory_bytes"), goroutines: m.get("go_goroutines")}
}

func (u usage) String() string {
	return fmt.Sprintf("RSS %.1f MiB, %.0f goroutines", u.rss/(1<<20), u.goroutines)
}
