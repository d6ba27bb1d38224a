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
	// One derivation: the public key comes with the private one (nkeys'
	// PublicKey would derive it again).
	priv := ed25519.NewKeyFromSeed(raw)
	pubRaw := priv.Public().(ed25519.PublicKey)
	pubPrefix, err := publicPrefix(prefix)
	if err != nil {
		return kp
	}
	pub, err := nkeys.Encode(pubPrefix, pubRaw)
	if err != nil {
		return kp
	}
	return &fastKey{KeyPair: kp, pub: string(pub), priv: priv, raw: pubRaw}
}

// publicPrefix is the public key prefix of a seed's key type.
func publicPrefix(seedPrefix nkeys.PrefixByte) (nkeys.PrefixByte, error) {
	switch seedPrefix {
	case nkeys.PrefixByteUser, nkeys.PrefixByteAccount, nkeys.PrefixByteOperator, nkeys.PrefixByteServer, nkeys.PrefixByteCluster:
		return seedPrefix, nil
	}
	return 0, nkeys.ErrInvalidPrefixByte
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
