package model

// Paging of the admin API's listings. A listing verb takes a Page in its
// arguments and answers one page of items in a stable order with Next, the
// cursor of the following page ("" when this was the last). Cursors are
// opaque: pass them back as Page.After unchanged. The coordinator caps
// Limit (and the bytes of a page), so a reply always fits a NATS message.

// Page selects one page of a listing.
type Page struct {
	// After is the Next of the previous page ("": from the start).
	After string `json:"after,omitempty"`
	// Limit is the most items wanted (0: the server's cap, which also
	// bounds larger values).
	Limit int `json:"limit,omitempty"`
}

// ListQuery is the argument of listing verbs without filters: tokens,
// admins, releases, rollouts.
type ListQuery struct {
	Page Page `json:"page,omitzero"`
}

// PageOf is one page of a listing.
type PageOf[T any] struct {
	Items []T `json:"items"`
	// Next is the cursor of the next page ("" when done).
	Next string `json:"next,omitempty"`
	// Total counts every item of the listing when that is cheap to know
	// (-1: not counted).
	Total int `json:"total"`
}
