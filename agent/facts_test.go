package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"fleet/model"
)

// fixture writes a /proc-like tree under a temp root.
func fixture(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

const lsblkLUKS = `{"blockdevices": [
 {"name":"nvme0n1","type":"disk","fstype":null,"mountpoint":null,"children":[
  {"name":"nvme0n1p1","type":"part","fstype":"vfat","mountpoint":"/boot"},
  {"name":"nvme0n1p2","type":"part","fstype":"crypto_LUKS","mountpoint":null,"children":[
   {"name":"cryptroot","type":"crypt","fstype":"ext4","mountpoint":"/"}]}]},
 {"name":"sda","type":"disk","fstype":"crypto_LUKS","mountpoint":null}]}`

func TestHostFactsFromFixture(t *testing.T) {
	root := fixture(t, map[string]string{
		"/proc/sys/kernel/hostname":  "laptop-7\n",
		"/proc/sys/kernel/osrelease": "6.6.30\n",
		"/proc/uptime":               "12345.67 99999.00\n",
		"/proc/loadavg":              "0.50 0.25 0.10 1/234 5678\n",
		"/proc/meminfo":              "MemTotal:       16000000 kB\nMemFree:  1 kB\nMemAvailable:    8000000 kB\n",
		"/proc/self/mounts": "/dev/mapper/cryptroot / ext4 rw 0 0\nproc /proc proc rw 0 0\ntmpfs /run tmpfs rw 0 0\n" +
			"/dev/nvme0n1p1 /boot vfat rw 0 0\n/dev/sdb1 /mnt/my\\040disk ext4 rw 0 0\n/dev/mapper/cryptroot /nix/store ext4 ro 0 0\n",
		"/nix/store/aaaa-sys-new/nixos-version": "24.05.1234\n",
		"/nix/store/k1/kernel":                  "k1",
		"/nix/store/k2/kernel":                  "k2",
	})
	sys := func(name, kernel string) {
		symlink(t, "/nix/store/"+kernel+"/kernel", filepath.Join(root, "/nix/store", name, "kernel"))
		symlink(t, "/nix/store/k1/kernel", filepath.Join(root, "/nix/store", name, "initrd"))
		symlink(t, "/nix/store/k1", filepath.Join(root, "/nix/store", name, "kernel-modules"))
	}
	// Links are absolute inside the fixture root, as on a real host.
	abs := func(p string) string { return filepath.Join(root, p) }
	sys("aaaa-sys-new", "k2")
	sys("bbbb-sys-old", "k1")
	for _, n := range []string{"aaaa-sys-new", "bbbb-sys-old"} {
		for _, part := range []string{"kernel", "initrd", "kernel-modules"} {
			l := abs("/nix/store/" + n + "/" + part)
			tgt, _ := os.Readlink(l)
			os.Remove(l)
			symlink(t, abs(tgt), l)
		}
	}
	symlink(t, abs("/nix/store/aaaa-sys-new"), abs("/run/current-system"))
	symlink(t, abs("/nix/store/bbbb-sys-old"), abs("/run/booted-system"))

	var statted []string
	h := &Host{Root: root, CurrentSystem: "/run/current-system", BootedSystem: "/run/booted-system",
		Lsblk: func(context.Context) ([]byte, error) { return []byte(lsblkLUKS), nil },
		Statfs: func(p string) (uint64, uint64, error) {
			statted = append(statted, p)
			return 1000, 250, nil
		},
	}
	f := CollectFacts(context.Background(), "UDEV", h.Sources())
	if len(f.Unknown) != 0 {
		t.Fatalf("unknown: %v", f.Unknown)
	}
	if f.Hostname != "laptop-7" || f.Kernel != "6.6.30" || f.NixOSVersion != "24.05.1234" {
		t.Fatalf("host facts: %+v", f)
	}
	if f.CurrentSystem != "/nix/store/aaaa-sys-new" || f.BootedSystem != "/nix/store/bbbb-sys-old" || !f.RebootNeeded {
		t.Fatalf("systems: current %q booted %q reboot %v", f.CurrentSystem, f.BootedSystem, f.RebootNeeded)
	}
	if f.UptimeSeconds != 12345.67 || f.Load != [3]float64{0.5, 0.25, 0.1} {
		t.Fatalf("uptime/load: %v %v", f.UptimeSeconds, f.Load)
	}
	if f.MemoryTotal != 16000000*1024 || f.MemoryAvail != 8000000*1024 {
		t.Fatalf("memory: %d %d", f.MemoryTotal, f.MemoryAvail)
	}
	if !slices.Equal(statted, []string{"/", "/boot", "/mnt/my disk"}) {
		t.Fatalf("mounts statted: %q (pseudo fs and /nix/store must be skipped)", statted)
	}
	if len(f.Mounts) != 3 || f.Mounts[0].UsedRatio() != 0.25 {
		t.Fatalf("mounts: %+v", f.Mounts)
	}
	if f.Encryption.RootEncrypted == nil || !*f.Encryption.RootEncrypted || !slices.Equal(f.Encryption.LUKSDevices, []string{"nvme0n1p2", "sda"}) {
		t.Fatalf("encryption: %+v", f.Encryption)
	}
}

// Every missing or broken source is named in Unknown; nothing panics.
func TestHostFactsMissingSources(t *testing.T) {
	root := fixture(t, map[string]string{
		"/proc/loadavg":   "garbage\n",
		"/proc/meminfo":   "MemTotal: 12 kB\n",
		"/etc/os-release": "ID=debian\nVERSION_ID=\"12\"\n",
	})
	h := &Host{Root: root, CurrentSystem: "/run/current-system", BootedSystem: "/run/booted-system",
		Lsblk: func(context.Context) ([]byte, error) { return nil, errors.New("lsblk: not found") }}
	f := CollectFacts(context.Background(), "UDEV", h.Sources())
	want := []string{"hostname", "nixos_version", "current_system", "booted_system", "reboot_needed",
		"kernel", "uptime", "load", "memory", "mounts", "encryption"}
	if !slices.Equal(f.Unknown, want) {
		t.Fatalf("unknown %v, want %v", f.Unknown, want)
	}
	if f.AgentVersion == "" || f.Device != "UDEV" {
		t.Fatalf("facts: %+v", f)
	}
}

func TestNixOSVersionFromOSRelease(t *testing.T) {
	root := fixture(t, map[string]string{"/etc/os-release": "NAME=NixOS\nID=nixos\nVERSION_ID=\"24.11\"\n"})
	h := &Host{Root: root, CurrentSystem: "/run/current-system"}
	var f model.Facts
	if err := h.nixosVersion(context.Background(), &f); err != nil || f.NixOSVersion != "24.11" {
		t.Fatalf("got %q, %v", f.NixOSVersion, err)
	}
}

func TestParsers(t *testing.T) {
	if _, err := ParseUptime(""); err == nil {
		t.Error("empty uptime accepted")
	}
	if _, err := ParseUptime("-3 1"); err == nil {
		t.Error("negative uptime accepted")
	}
	if _, err := ParseLoadavg("1 2"); err == nil {
		t.Error("short loadavg accepted")
	}
	if _, _, err := ParseMeminfo([]byte("MemTotal: x kB\nMemAvailable: 1 kB")); err == nil {
		t.Error("bad meminfo accepted")
	}
	if _, _, err := ParseMeminfo([]byte("MemTotal: 99999999999999999999 kB\nMemAvailable: 1 kB")); err == nil {
		t.Error("overflowing meminfo accepted")
	}
	if _, _, err := ParseMeminfo([]byte("MemTotal: 18446744073709551 kB\nMemAvailable: 1 kB")); err == nil {
		t.Error("overflow by kB accepted")
	}
	for _, bad := range []string{"", "{", `{"blockdevices": 3}`, "[]"} {
		if _, err := ParseLsblk([]byte(bad)); err == nil {
			t.Errorf("lsblk %q accepted", bad)
		}
	}
	enc, err := ParseLsblk([]byte(`{"blockdevices":[{"name":"vda","type":"disk","fstype":"ext4","mountpoint":"/"}]}`))
	if err != nil || enc.RootEncrypted == nil || *enc.RootEncrypted {
		t.Fatalf("plain root: %+v %v", enc, err)
	}
	enc, _ = ParseLsblk([]byte(`{"blockdevices":[]}`))
	if enc.RootEncrypted != nil {
		t.Fatal("root encryption claimed without a root device")
	}
	if m := ParseMounts([]byte("short line\n/dev/x /a\\040b ext4 rw 0 0\n/dev/y /bad\\9 ext4\n")); len(m) != 2 || m[0].Path != "/a b" || m[1].Path != `/bad\9` {
		t.Fatalf("mounts: %+v", m)
	}
}
