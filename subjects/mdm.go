package subjects

// Admin API verbs of the MDM duties: remote commands, sealed payloads,
// recovery-key escrow.
const (
	// VerbCommand sends admin-signed commands to devices (write).
	VerbCommand = "command"
)
