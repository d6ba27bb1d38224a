package broker

// The MDM duties' verbs (remote commands, sealed payloads, recovery-key
// escrow), added to the admin API by startAPI.
func (s *services) mdmVerbs() []apiVerb {
	return []apiVerb{
		s.commandVerb(),
	}
}
