package accounts

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// Creds is a user's JWT with the key that proves it.
type Creds struct {
	JWT string
	Key nkeys.KeyPair
}

// PublicKey is the user's public key (for a device, its device ID).
func (c *Creds) PublicKey() string {
	if c.Key == nil {
		// A bearer JWT alone: its subject is the key.
		if uc, err := c.Claims(); err == nil {
			return uc.Subject
		}
		return ""
	}
	pub, _ := c.Key.PublicKey()
	return pub
}

// InboxPrefix is the reply prefix this user's role allows (from the role and
// site tags its JWT carries; admins' when it has none).
func (c *Creds) InboxPrefix() string {
	return subjects.InboxPrefixFor(c.Role(), c.Site(), c.PublicKey())
}

// Role is the role tag of the user JWT ("" when it has none).
func (c *Creds) Role() subjects.Role {
	return subjects.Role(c.tag("role"))
}

// Site is the site tag of the user JWT; a device's is the hub's when it has
// none.
func (c *Creds) Site() string {
	if s := c.tag("site"); s != "" {
		return s
	}
	return subjects.DefaultSite
}

func (c *Creds) tag(name string) string {
	uc, err := c.Claims()
	if err != nil {
		return ""
	}
	for _, t := range uc.Tags {
		if v, ok := strings.CutPrefix(t, name+":"); ok {
			return v
		}
	}
	return ""
}

// Claims decodes the user JWT.
func (c *Creds) Claims() (*jwt.UserClaims, error) {
	return jwt.DecodeUserClaims(c.JWT)
}

// Bytes renders the creds in the standard .creds format that nats CLI and
// every NATS client read.
func (c *Creds) Bytes() ([]byte, error) {
	seed, err := c.Key.Seed()
	if err != nil {
		return nil, fmt.Errorf("creds seed: %w", err)
	}
	return jwt.FormatUserConfig(c.JWT, seed)
}

// WriteCreds writes c to path with mode 0600, creating parent directories.
// It writes to a temporary file first so a crash leaves no half file.
func WriteCreds(path string, c *Creds) error {
	b, err := c.Bytes()
	if err != nil {
		return err
	}
	return WriteSecretFile(path, b)
}

// ReadCreds reads and checks a .creds file: it must hold a user JWT and the
// matching user seed.
func ReadCreds(path string) (*Creds, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read creds %s: %w", path, err)
	}
	return ParseCreds(b, path)
}

// ParseCreds parses the contents of a .creds file; name is used in errors.
func ParseCreds(b []byte, name string) (*Creds, error) {
	tok, err := jwt.ParseDecoratedJWT(b)
	if err != nil || tok == "" {
		return nil, fmt.Errorf("creds %s: no user JWT found: the file is damaged or not a .creds file", name)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return nil, fmt.Errorf("creds %s: invalid user JWT: %w", name, err)
	}
	kp, err := jwt.ParseDecoratedUserNKey(b)
	if err != nil {
		return nil, fmt.Errorf("creds %s: no user seed found: %w", name, err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("creds %s: %w", name, err)
	}
	if pub != uc.Subject {
		return nil, fmt.Errorf("creds %s: the seed does not belong to the JWT (key %s, JWT for %s)", name, pub, uc.Subject)
	}
	return &Creds{JWT: tok, Key: FastKey(kp)}, nil
}

// WriteSecretFile writes b to path atomically, readable by its owner only
// (0600), creating parent directories (0700). A crash leaves the old file or
// the new one, never half of either.
func WriteSecretFile(path string, b []byte) error {
	// The agent writes its state a few times an apply: no more system
	// calls than the guarantee needs (CreateTemp makes the file 0600; the
	// directory is made only when it is missing; the temporary file is
	// removed only when it was not renamed).
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create directory for %s: %w", path, err)
		}
		tmp, err = os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	renamed := false
	defer func() {
		if !renamed {
			_ = os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	renamed = true
	// The rename is durable once the directory is synced.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// WriteSeed writes kp's seed to path (0600).
func WriteSeed(path string, kp nkeys.KeyPair) error {
	seed, err := kp.Seed()
	if err != nil {
		return fmt.Errorf("seed for %s: %w", path, err)
	}
	return WriteSecretFile(path, append(seed, '\n'))
}

// ReadSeed reads an nkey seed file and checks that it holds the expected
// kind of key.
func ReadSeed(path string, prefix nkeys.PrefixByte) (nkeys.KeyPair, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("key file %s is missing: restore it from a backup of the data dir", path)
	}
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	kp, err := nkeys.ParseDecoratedNKey(b)
	if err != nil {
		return nil, fmt.Errorf("key file %s is damaged (%w): restore it from a backup", path, err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("key file %s is damaged (%w): restore it from a backup", path, err)
	}
	if p := nkeys.Prefix(pub); p != prefix {
		return nil, fmt.Errorf("key file %s holds a %s key, want %s", path, p, prefix)
	}
	// The coordinator signs a JWT or two with these per enrolment.
	return FastKey(kp), nil
}
