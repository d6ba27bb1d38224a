package accounts

import (
	"bytes"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"

	"fleet/subjects"
)

// FuzzParseCreds feeds ParseCreds damaged and hostile .creds contents: it
// must never panic, and whatever it accepts must be a user JWT with the seed
// of that very user.
func FuzzParseCreds(f *testing.F) {
	a, err := Create(f.TempDir(), subjects.Domain, DefaultLimits)
	if err != nil {
		f.Fatal(err)
	}
	c, err := a.NewUser(subjects.RoleAgent, "d", 0)
	if err != nil {
		f.Fatal(err)
	}
	good, err := c.Bytes()
	if err != nil {
		f.Fatal(err)
	}
	kp, _ := nkeys.CreateUser()
	leafTok, err := a.IssueSiteUser(subjects.RoleLeaf, mustPub(kp), "l", "berlin", 0)
	if err != nil {
		f.Fatal(err)
	}
	leaf, err := (&Creds{JWT: leafTok, Key: kp}).Bytes()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(leaf)
	seed, _ := c.Key.Seed()
	acc, _ := nkeys.CreateAccount()
	accSeed, _ := acc.Seed()
	_, fleetJWT, _ := a.AccountJWTs()
	f.Add(good)
	f.Add([]byte(c.JWT))
	f.Add(seed)
	f.Add([]byte{})
	f.Add(good[:len(good)/2])
	f.Add(bytes.Replace(good, seed, accSeed, 1))
	f.Add(bytes.Replace(good, []byte(c.JWT), []byte(fleetJWT), 1))
	f.Add([]byte("-----BEGIN NATS USER JWT-----\n\n------END NATS USER JWT------\n"))
	f.Add([]byte("-----BEGIN NATS USER JWT-----\na.b.c\n------END NATS USER JWT------\n-----BEGIN USER NKEY SEED-----\nSU\n------END USER NKEY SEED------\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cr, err := ParseCreds(b, "fuzz.creds")
		if err != nil {
			if cr != nil {
				t.Fatal("error with non-nil creds")
			}
			return
		}
		uc, err := cr.Claims()
		if err != nil {
			t.Fatalf("accepted creds whose JWT does not decode: %v", err)
		}
		if cr.PublicKey() != uc.Subject || !nkeys.IsValidPublicUserKey(uc.Subject) {
			t.Fatalf("accepted creds with key %s for JWT subject %s", cr.PublicKey(), uc.Subject)
		}
		if _, err := cr.Bytes(); err != nil {
			t.Fatalf("accepted creds cannot be written back: %v", err)
		}
		// Whatever tags the JWT carries, the inbox is the user's own.
		if cr.Site() == "" || !strings.HasSuffix(cr.InboxPrefix(), "."+cr.PublicKey()) && cr.InboxPrefix() != subjects.InboxPrefix(cr.PublicKey()) {
			t.Fatalf("accepted creds: site %q, inbox %q for key %s", cr.Site(), cr.InboxPrefix(), cr.PublicKey())
		}
	})
}
