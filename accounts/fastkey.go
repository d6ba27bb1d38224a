package accounts

import (
	"crypto/ed25519"

	"github.com/nats-io/nkeys"
)

// FastKey returns kp, an nkeys user, account or operator key pair, with
// its ed25519 key derived once. nkeys derives it from the seed on every
// PublicKey, Sign and Verify (a scalar multiplication each): an agent
// signing every report paid for the derivation twice per report, which on
// a small device, or 10,000 simulated ones, is most of what signing costs.
// Curve keys (and anything else that is not a signing key) are returned
// as they are.
func FastKey(kp nkeys.KeyPair) nkeys.KeyPair {
	if kp == nil {
		return nil
	}
	if _, ok := kp.(*fastKey); ok {
		return kp
	}
	seed, err := kp.Seed()
	if err != nil {
		return kp
	}
	prefix, raw, err := nkeys.DecodeSeed(seed)
	if err != nil || prefix == nkeys.PrefixByteCurve || len(raw) != ed25519.SeedSize {
		return kp
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return kp
	}
	priv := ed25519.NewKeyFromSeed(raw)
	return &fastKey{KeyPair: kp, pub: pub, priv: priv, raw: priv.Public().(ed25519.PublicKey)}
}

type fastKey struct {
	nkeys.KeyPair
	pub  string
	priv ed25519.PrivateKey
	raw  ed25519.PublicKey
}

func (k *fastKey) PublicKey() (string, error) { return k.pub, nil }

func (k *fastKey) Sign(input []byte) ([]byte, error) { return ed25519.Sign(k.priv, input), nil }

func (k *fastKey) Verify(input, sig []byte) error {
	if !ed25519.Verify(k.raw, input, sig) {
		return nkeys.ErrInvalidSignature
	}
	return nil
}

// Wipe clears the derived key along with the seed.
func (k *fastKey) Wipe() {
	clear(k.priv)
	k.KeyPair.Wipe()
}
