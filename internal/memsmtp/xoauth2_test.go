package memsmtp

import "testing"

func TestParseXOAUTH2(t *testing.T) {
	tests := []struct {
		in          string
		user, token string
		ok          bool
	}{
		{"user=m@x\x01auth=Bearer tok\x01\x01", "m@x", "tok", true},
		{"user=m@x\x01auth=Bearer tok\x01", "", "", false},
		{"user=m@x\x01auth=Bearer \x01\x01", "", "", false},
		{"user=m@x\x01auth=Basic tok\x01\x01", "", "", false},
		{"m@x\x01auth=Bearer tok\x01\x01", "", "", false},
		{"", "", "", false},
	}
	for _, tt := range tests {
		user, token, ok := parseXOAUTH2([]byte(tt.in))
		if ok != tt.ok || (ok && (user != tt.user || token != tt.token)) {
			t.Errorf("parseXOAUTH2(%q) = %q, %q, %v; want %q, %q, %v", tt.in, user, token, ok, tt.user, tt.token, tt.ok)
		}
	}
}
