package model

import (
	"bytes"
	"crypto/sha256"
	"strings"
	"testing"
)

func TestNix32(t *testing.T) {
	empty := sha256.Sum256(nil)
	// nix hash to-base32 sha256:e3b0c442…b855
	if got := Nix32Encode(empty[:]); got != "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73" {
		t.Fatalf("nix32 of sha256(\"\") = %s", got)
	}
	for _, n := range []int{1, 5, 20, 32, 64} {
		b := bytes.Repeat([]byte{0xa5, 0x3c, 0xff}, n)[:n]
		got, err := Nix32Decode(Nix32Encode(b), n)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("round trip of %d bytes: %x %v", n, got, err)
		}
	}
	// A value that does not fit (the top bits set past the size) is refused.
	if _, err := Nix32Decode("z"+strings.Repeat("0", 51), 32); err == nil {
		t.Fatal("overflowing nix32 accepted")
	}
}

// sampleNarInfo is what nix copy --to file:// wrote for a test path.
const sampleNarInfo = `StorePath: /nix/store/0r2v93mqaf9d2zyqi8pgmyzmf879753y-top
URL: nar/0vz57xli0mykd77rimfl8cs3hy36cgmk4bc1m9vq3iwglvja19a6.nar.zst
Compression: zstd
FileHash: sha256:0vz57xli0mykd77rimfl8cs3hy36cgmk4bc1m9vq3iwglvja19a6
FileSize: 130
NarHash: sha256:0q6yj9sbg7xi8kks5cmqc38xcpprb64a18cq9d67pds7sw04di7k
NarSize: 160
References: z4asv3j07d89ywjf8fxkn7sg6mf5s9q5-dep
Deriver: 13ymk1q4wh30z4fq5lf3a5d15fvb07f9-top.drv
Sig: k1:xOXs9Lrk9QrqBELqrzouehoAWHridUlfy5Ad8tq7ZLpQd5sJUXiwtaUUG6X0Oq3gimo1MSEFRW0+YHnrzvlGDA==
`

func TestParseNarInfo(t *testing.T) {
	ni, err := ParseNarInfo([]byte(sampleNarInfo))
	if err != nil {
		t.Fatal(err)
	}
	if ni.String() != sampleNarInfo || ni.HashPart() != "0r2v93mqaf9d2zyqi8pgmyzmf879753y" || strings.Join(ni.SigKeys(), ",") != "k1" {
		t.Fatalf("parsed %+v\n%s", ni, ni.String())
	}
	for name, bad := range map[string]string{
		"unknown field":     sampleNarInfo + "Evil: 1\n",
		"twice":             sampleNarInfo + "NarSize: 160\n",
		"url not file hash": strings.Replace(sampleNarInfo, "URL: nar/0vz", "URL: nar/1vz", 1),
		"url escapes":       strings.Replace(sampleNarInfo, "URL: nar/", "URL: nar/../", 1),
		"wrong extension":   strings.Replace(sampleNarInfo, ".nar.zst", ".nar.xz", 1),
		"compression":       strings.Replace(sampleNarInfo, "Compression: zstd", "Compression: gzip", 1),
		"size":              strings.Replace(sampleNarInfo, "FileSize: 130", "FileSize: 0130", 1),
		"hash":              strings.Replace(sampleNarInfo, "NarHash: sha256:", "NarHash: md5:", 1),
		"reference":         strings.Replace(sampleNarInfo, "References: z4", "References: ../z4", 1),
		"signature":         strings.Replace(sampleNarInfo, "Sig: k1:", "Sig: k1 ", 1),
		"no colon":          sampleNarInfo + "garbage\n",
		"store path":        strings.Replace(sampleNarInfo, "StorePath: /nix/store/", "StorePath: /tmp/", 1),
		"none but hashes":   strings.Replace(strings.Replace(sampleNarInfo, "Compression: zstd", "Compression: none", 1), ".nar.zst", ".nar", 1),
		"missing narhash":   strings.Replace(sampleNarInfo, "NarHash: sha256:0q6yj9sbg7xi8kks5cmqc38xcpprb64a18cq9d67pds7sw04di7k\n", "", 1),
	} {
		if _, err := ParseNarInfo([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// FuzzParseNarInfo: no input panics, and whatever parses is served as
// its String, which parses back to the same narinfo.
func FuzzParseNarInfo(f *testing.F) {
	f.Add([]byte(sampleNarInfo))
	f.Add([]byte("StorePath: /nix/store/0r2v93mqaf9d2zyqi8pgmyzmf879753y-top\nReferences:\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		ni, err := ParseNarInfo(b)
		if err != nil {
			return
		}
		again, err := ParseNarInfo([]byte(ni.String()))
		if err != nil {
			t.Fatalf("String does not parse: %v\n%s", err, ni.String())
		}
		if again.String() != ni.String() {
			t.Fatalf("String is not stable:\n%s\n%s", ni.String(), again.String())
		}
		if CheckNarURL(ni.URL) != nil || CheckStoreHash(ni.HashPart()) != nil {
			t.Fatalf("parsed narinfo with a bad URL or store path: %+v", ni)
		}
	})
}
