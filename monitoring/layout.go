package monitoring

import (
	"bytes"
	"fmt"
	"html"
	"regexp"

	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
)

// LayoutFile is the picture of the dashboard's layout that the README
// shows, relative to this module's directory.
const LayoutFile = "grafana/smtppool-dashboard.svg"

// Grafana's grid is 24 columns wide; these are the picture's pixels per
// column and per grid row.
const (
	colWidth  = 50
	rowHeight = 28
	margin    = 8
	header    = 44
)

// palette is Grafana's classic series colours, in order.
var palette = []string{"#73BF69", "#FADE2A", "#5794F2", "#FF9830", "#F2495C", "#B877D9", "#8AB8FF"}

var legendVar = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

// LayoutSVG draws the dashboard's panels where Grafana places them, each
// with its title, its kind and the series its queries draw (legends; "each
// state" where a legend is one series per label value). It is a picture of
// the layout, with no data.
func LayoutSVG(d dashboard.Dashboard) []byte {
	var maxY uint32
	for _, p := range d.Panels {
		if p.Panel != nil && p.Panel.GridPos != nil && p.Panel.GridPos.Y+p.Panel.GridPos.H > maxY {
			maxY = p.Panel.GridPos.Y + p.Panel.GridPos.H
		}
	}
	width, height := 24*colWidth+2*margin, header+int(maxY)*rowHeight+margin
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Inter, Helvetica, Arial, sans-serif">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#111217"/>`+"\n", width, height)
	title := "smtppool"
	if d.Title != nil {
		title = *d.Title
	}
	fmt.Fprintf(&b, `<text x="%d" y="28" fill="#ccccdc" font-size="18" font-weight="600">%s</text>`+"\n", margin+4, html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="%d" y="28" fill="#8e8e8e" font-size="12" text-anchor="end">Grafana dashboard layout, drawn from monitoring/dashboard.go (make generate); variables: data source, job, instance</text>`+"\n", width-margin-4)
	for _, p := range d.Panels {
		if p.Panel == nil || p.Panel.GridPos == nil {
			continue
		}
		drawPanel(&b, p.Panel)
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

func drawPanel(b *bytes.Buffer, p *dashboard.Panel) {
	g := p.GridPos
	x, y := margin+int(g.X)*colWidth+3, header+int(g.Y)*rowHeight+3
	w, h := int(g.W)*colWidth-6, int(g.H)*rowHeight-6
	fmt.Fprintf(b, `<g><rect x="%d" y="%d" width="%d" height="%d" rx="4" fill="#181b1f" stroke="#2c3235"/>`+"\n", x, y, w, h)
	title := ""
	if p.Title != nil {
		title = *p.Title
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" fill="#ccccdc" font-size="13" font-weight="600">%s</text>`+"\n", x+8, y+18, html.EscapeString(title))
	kind := map[string]string{"timeseries": "time series", "stat": "stat"}[p.Type]
	if kind == "" {
		kind = p.Type
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" fill="#6e6e76" font-size="11" text-anchor="end">%s</text>`+"\n", x+w-8, y+18, kind)

	var legends []string
	for _, t := range p.Targets {
		if q, ok := t.(prometheus.Dataquery); ok && q.LegendFormat != nil {
			legends = append(legends, legendVar.ReplaceAllString(*q.LegendFormat, "each $1"))
		}
	}
	if p.Type == "stat" {
		// One value per query, side by side.
		for i, l := range legends {
			fmt.Fprintf(b, `<text x="%d" y="%d" fill="%s" font-size="13">%s</text>`+"\n",
				x+8+i*(w-16)/len(legends), y+h/2+12, palette[0], html.EscapeString(l))
		}
		b.WriteString("</g>\n")
		return
	}
	// A time series panel: empty axes (this is no data) and the legend.
	px, py, pw, ph := x+36, y+30, w-48, h-70
	fmt.Fprintf(b, `<path d="M%d %d V%d H%d" stroke="#2c3235" fill="none"/>`+"\n", px, py, py+ph, px+pw)
	for i, l := range legends {
		c := palette[i%len(palette)]
		lx := x + 8 + (i%3)*(w/3)
		ly := y + h - 28 + (i/3)*14
		fmt.Fprintf(b, `<rect x="%d" y="%d" width="10" height="3" fill="%s"/><text x="%d" y="%d" fill="#ccccdc" font-size="11">%s</text>`+"\n",
			lx, ly-4, c, lx+14, ly, html.EscapeString(l))
	}
	b.WriteString("</g>\n")
}
