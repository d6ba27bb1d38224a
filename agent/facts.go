package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"fleet/model"
)

// FactSource fills some fields of a Facts report. A source that cannot be
// read returns an error and is listed in Facts.Unknown.
type FactSource interface {
	Name() string
	Collect(ctx context.Context, f *model.Facts) error
}

// FactSourceFunc adapts a function to FactSource.
type FactSourceFunc struct {
	N string
	F func(ctx context.Context, f *model.Facts) error
}

func (s FactSourceFunc) Name() string                                      { return s.N }
func (s FactSourceFunc) Collect(ctx context.Context, f *model.Facts) error { return s.F(ctx, f) }

// Host reads facts of a Linux/NixOS host. Root prefixes every file it reads
// ("" or "/" for the real host; tests pass a fixture tree).
type Host struct {
	Root          string
	CurrentSystem string
	BootedSystem  string
	// Profile is the system profile; when it points elsewhere than the
	// running system, a generation is pending for the next boot.
	Profile string
	// Lsblk returns `lsblk --json` output; nil runs lsblk.
	Lsblk func(ctx context.Context) ([]byte, error)
	// Statfs returns size and used bytes of a mount; nil uses statfs(2).
	Statfs func(path string) (size, used uint64, err error)
}

func (h *Host) path(p string) string {
	if h.Root == "" || h.Root == "/" {
		return p
	}
	return filepath.Join(h.Root, p)
}

func (h *Host) read(p string) (string, error) {
	b, err := os.ReadFile(h.path(p))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// Sources lists the host's fact sources.
func (h *Host) Sources() []FactSource {
	return []FactSource{
		FactSourceFunc{"hostname", func(_ context.Context, f *model.Facts) error {
			s, err := h.read("/proc/sys/kernel/hostname")
			if err == nil && s == "" {
				err = errors.New("empty")
			}
			f.Hostname = s
			return err
		}},
		FactSourceFunc{"nixos_version", h.nixosVersion},
		FactSourceFunc{"current_system", func(_ context.Context, f *model.Facts) error {
			p, err := filepath.EvalSymlinks(h.path(h.CurrentSystem))
			f.CurrentSystem = h.unroot(p)
			return err
		}},
		FactSourceFunc{"booted_system", func(_ context.Context, f *model.Facts) error {
			p, err := filepath.EvalSymlinks(h.path(h.BootedSystem))
			f.BootedSystem = h.unroot(p)
			return err
		}},
		FactSourceFunc{"reboot_needed", h.rebootNeeded},
		FactSourceFunc{"kernel", func(_ context.Context, f *model.Facts) error {
			s, err := h.read("/proc/sys/kernel/osrelease")
			f.Kernel = s
			return err
		}},
		FactSourceFunc{"uptime", func(_ context.Context, f *model.Facts) error {
			s, err := h.read("/proc/uptime")
			if err != nil {
				return err
			}
			f.UptimeSeconds, err = ParseUptime(s)
			return err
		}},
		FactSourceFunc{"load", func(_ context.Context, f *model.Facts) error {
			s, err := h.read("/proc/loadavg")
			if err != nil {
				return err
			}
			f.Load, err = ParseLoadavg(s)
			return err
		}},
		FactSourceFunc{"memory", func(_ context.Context, f *model.Facts) error {
			b, err := os.ReadFile(h.path("/proc/meminfo"))
			if err != nil {
				return err
			}
			f.MemoryTotal, f.MemoryAvail, err = ParseMeminfo(b)
			return err
		}},
		FactSourceFunc{"mounts", h.mounts},
		FactSourceFunc{"encryption", h.encryption},
	}
}

func (h *Host) unroot(p string) string {
	if h.Root == "" || h.Root == "/" || p == "" {
		return p
	}
	if r, err := filepath.Rel(h.Root, p); err == nil && !strings.HasPrefix(r, "..") {
		return "/" + r
	}
	return p
}

func (h *Host) nixosVersion(_ context.Context, f *model.Facts) error {
	if s, err := h.read(filepath.Join(h.CurrentSystem, "nixos-version")); err == nil && s != "" {
		f.NixOSVersion = s
		return nil
	}
	b, err := os.ReadFile(h.path("/etc/os-release"))
	if err != nil {
		return err
	}
	osr := ParseOSRelease(b)
	v := osr["VERSION_ID"]
	if v == "" {
		v = osr["VERSION"]
	}
	if osr["ID"] != "nixos" || v == "" {
		return fmt.Errorf("not NixOS (ID=%q)", osr["ID"])
	}
	f.NixOSVersion = v
	return nil
}

// rebootNeeded compares the kernel, initrd and modules of the booted and
// the current system, as NixOS's own "reboot required" checks do. A system
// profile pointing elsewhere than the running system (a generation applied
// with boot, pending) needs a reboot too.
func (h *Host) rebootNeeded(_ context.Context, f *model.Facts) error {
	if h.Profile != "" {
		p, errP := filepath.EvalSymlinks(h.path(h.Profile))
		c, errC := filepath.EvalSymlinks(h.path(h.CurrentSystem))
		// No profile at all (not NixOS, or a fresh test host) pends nothing.
		if errP == nil && errC == nil && p != c {
			f.RebootNeeded = true
		}
	}
	for _, part := range []string{"kernel", "initrd", "kernel-modules"} {
		b, errB := filepath.EvalSymlinks(h.path(filepath.Join(h.BootedSystem, part)))
		c, errC := filepath.EvalSymlinks(h.path(filepath.Join(h.CurrentSystem, part)))
		if errB != nil || errC != nil {
			return fmt.Errorf("compare %s: %w", part, errors.Join(errB, errC))
		}
		if b != c {
			f.RebootNeeded = true
		}
	}
	return nil
}

// pseudoFS are file systems without disk space of their own.
var pseudoFS = map[string]bool{
	"proc": true, "sysfs": true, "devtmpfs": true, "devpts": true, "tmpfs": true,
	"cgroup": true, "cgroup2": true, "pstore": true, "bpf": true, "securityfs": true,
	"debugfs": true, "tracefs": true, "configfs": true, "fusectl": true, "mqueue": true,
	"hugetlbfs": true, "autofs": true, "binfmt_misc": true, "efivarfs": true, "ramfs": true,
	"rpc_pipefs": true, "nsfs": true, "overlay": true, "squashfs": true, "fuse.gvfsd-fuse": true,
	"fuse.portal": true, "nfsd": true, "selinuxfs": true,
}

func (h *Host) mounts(_ context.Context, f *model.Facts) error {
	b, err := os.ReadFile(h.path("/proc/self/mounts"))
	if err != nil {
		return err
	}
	statfs := h.Statfs
	if statfs == nil {
		statfs = func(p string) (uint64, uint64, error) { return statfsBytes(h.path(p)) }
	}
	var errs []error
	for _, m := range ParseMounts(b) {
		if pseudoFS[m.FSType] || slices.ContainsFunc(f.Mounts, func(x model.Mount) bool { return x.Path == m.Path }) {
			continue
		}
		// The Nix store is often a bind or read-only remount of / on NixOS.
		if m.Path == "/nix/store" {
			continue
		}
		size, used, err := statfs(m.Path)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.Path, err))
			continue
		}
		m.SizeBytes, m.UsedBytes = size, used
		f.Mounts = append(f.Mounts, m)
	}
	return errors.Join(errs...)
}

func statfsBytes(p string) (uint64, uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(p, &st); err != nil {
		return 0, 0, err
	}
	bs := uint64(st.Bsize)
	return st.Blocks * bs, (st.Blocks - st.Bfree) * bs, nil
}

func (h *Host) encryption(ctx context.Context, f *model.Facts) error {
	lsblk := h.Lsblk
	if lsblk == nil {
		lsblk = func(ctx context.Context) ([]byte, error) {
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			var out bytes.Buffer
			cmd := exec.CommandContext(ctx, "lsblk", "--json", "-o", "NAME,TYPE,FSTYPE,MOUNTPOINT")
			cmd.Stdout = &out
			if err := cmd.Run(); err != nil {
				return nil, fmt.Errorf("lsblk: %w", err)
			}
			return out.Bytes(), nil
		}
	}
	b, err := lsblk(ctx)
	if err != nil {
		return err
	}
	enc, err := ParseLsblk(b)
	if err != nil {
		return err
	}
	f.Encryption = enc
	return nil
}

// CollectFacts runs every source; failures go to Unknown.
func CollectFacts(ctx context.Context, device string, sources []FactSource) model.Facts {
	f := model.Facts{Device: device, Time: time.Now().UTC(), AgentVersion: Version}
	for _, s := range sources {
		if err := s.Collect(ctx, &f); err != nil {
			f.Unknown = append(f.Unknown, s.Name())
		}
	}
	return f
}

// ParseUptime reads /proc/uptime's first field (seconds).
func ParseUptime(s string) (float64, error) {
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return 0, errors.New("uptime: empty")
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("uptime: bad value %q", fields[0])
	}
	return v, nil
}

// ParseLoadavg reads the three load averages of /proc/loadavg.
func ParseLoadavg(s string) ([3]float64, error) {
	var l [3]float64
	fields := strings.Fields(s)
	if len(fields) < 3 {
		return l, fmt.Errorf("loadavg: want 3 fields, got %d", len(fields))
	}
	for i := range l {
		v, err := strconv.ParseFloat(fields[i], 64)
		if err != nil || v < 0 {
			return l, fmt.Errorf("loadavg: bad value %q", fields[i])
		}
		l[i] = v
	}
	return l, nil
}

// ParseMeminfo returns MemTotal and MemAvailable of /proc/meminfo in bytes.
func ParseMeminfo(b []byte) (total, avail uint64, err error) {
	var haveT, haveA bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "MemTotal" && k != "MemAvailable") {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return 0, 0, fmt.Errorf("meminfo: %s has no value", k)
		}
		v, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("meminfo: %s: %w", k, err)
		}
		if len(fields) > 1 && fields[1] == "kB" {
			if v > (1<<64-1)/1024 {
				return 0, 0, fmt.Errorf("meminfo: %s too large", k)
			}
			v *= 1024
		}
		if k == "MemTotal" {
			total, haveT = v, true
		} else {
			avail, haveA = v, true
		}
	}
	if !haveT || !haveA {
		return 0, 0, errors.New("meminfo: MemTotal or MemAvailable missing")
	}
	return total, avail, nil
}

// ParseMounts reads /proc/self/mounts (octal escapes decoded).
func ParseMounts(b []byte) []model.Mount {
	var ms []model.Mount
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		ms = append(ms, model.Mount{Device: unescapeMount(fields[0]), Path: unescapeMount(fields[1]), FSType: fields[2]})
	}
	return ms
}

// unescapeMount decodes the kernel's \ooo escapes (space is \040).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ParseOSRelease reads KEY=value lines of os-release.
func ParseOSRelease(b []byte) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if !ok || k == "" || strings.HasPrefix(k, "#") {
			continue
		}
		if uq, err := strconv.Unquote(v); err == nil {
			v = uq
		} else {
			v = strings.Trim(v, `"'`)
		}
		m[k] = v
	}
	return m
}

// blockDev is a node of `lsblk --json`.
type blockDev struct {
	Name       string     `json:"name"`
	Type       string     `json:"type"`
	FSType     *string    `json:"fstype"`
	Mountpoint *string    `json:"mountpoint"`
	Children   []blockDev `json:"children"`
}

// ParseLsblk finds LUKS devices and whether / sits on an encrypted device:
// root is encrypted when one of its ancestors is a crypt device or holds
// crypto_LUKS.
func ParseLsblk(b []byte) (model.Encryption, error) {
	var doc struct {
		Blockdevices []blockDev `json:"blockdevices"`
	}
	var enc model.Encryption
	if err := json.Unmarshal(b, &doc); err != nil {
		return enc, fmt.Errorf("lsblk json: %w", err)
	}
	var rootFound, rootEnc bool
	var walk func(d blockDev, encrypted bool, depth int)
	walk = func(d blockDev, encrypted bool, depth int) {
		if depth > 64 {
			return // no real device tree is this deep
		}
		if d.FSType != nil && *d.FSType == "crypto_LUKS" {
			enc.LUKSDevices = append(enc.LUKSDevices, d.Name)
			encrypted = true
		}
		if d.Type == "crypt" {
			encrypted = true
		}
		if d.Mountpoint != nil && *d.Mountpoint == "/" {
			rootFound = true
			rootEnc = rootEnc || encrypted
		}
		for _, c := range d.Children {
			walk(c, encrypted, depth+1)
		}
	}
	for _, d := range doc.Blockdevices {
		walk(d, false, 0)
	}
	if rootFound {
		enc.RootEncrypted = &rootEnc
	}
	return enc, nil
}
