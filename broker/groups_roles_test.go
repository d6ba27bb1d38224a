package broker_test

import (
	"context"
	"strings"
	"testing"

	"fleet/admin"
	"fleet/model"
	"fleet/subjects"
)

// TestGroupVerbsHeldToRoles attacks pins, previews and undo through the
// real server as a viewer and as an operator limited to another group:
// each is refused, and the owner's view of the devices is unchanged.
func TestGroupVerbsHeldToRoles(t *testing.T) {
	c := startCoordinator(t)
	owner := ownerClient(t, c)
	ctx := context.Background()
	labCr, _ := enrollAgent(t, c, createToken(t, owner, 1, false, "lab").Token, "lab-1")
	opsCr, _ := enrollAgent(t, c, createToken(t, owner, 1, false, "ops").Token, "ops-1")
	rel := recordRelease(t, c, owner, "rel-roles")
	var ro model.DeployResult
	if err := owner.Call(ctx, subjects.VerbDeploy, true, model.DeployRequest{ReleaseID: rel.ID, Group: "ops", Strategy: "all"}, &ro); err != nil {
		t.Fatal(err)
	}
	viewer := addAdmin(t, c, subjects.RoleViewer, "viewer")
	labOp := addAdmin(t, c, subjects.RoleOperator, "lab-op", "lab")
	opsBefore, err := owner.Device(ctx, opsCr.PublicKey())
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		cl   *admin.Client
		verb string
		w    bool
		args any
		want string
	}{
		{"viewer pins", viewer, subjects.VerbDevicePin, true, model.DevicePin{Ref: labCr.PublicKey(), ReleaseID: rel.ID}, "needs role operator"},
		{"viewer previews a deploy", viewer, subjects.VerbDeployPreview, false, model.DeployRequest{ReleaseID: rel.ID, Group: "lab"}, "needs role operator"},
		{"viewer undoes", viewer, subjects.VerbRolloutAction, true, model.RolloutRef{ID: ro.ID, Action: model.RolloutUndo, ReleaseID: rel.ID}, "needs role operator"},
		{"lab operator pins an ops device", labOp, subjects.VerbDevicePin, true, model.DevicePin{Ref: opsCr.PublicKey(), ReleaseID: rel.ID}, "may act only on devices of groups lab"},
		{"lab operator unpins an ops device", labOp, subjects.VerbDevicePin, true, model.DevicePin{Ref: opsCr.PublicKey()}, "may act only on devices of groups lab"},
		{"lab operator previews ops", labOp, subjects.VerbDeployPreview, false, model.DeployRequest{ReleaseID: rel.ID, Group: "ops"}, "ops"},
		{"lab operator undoes an ops rollout", labOp, subjects.VerbRolloutAction, true, model.RolloutRef{ID: ro.ID, Action: model.RolloutUndo, ReleaseID: rel.ID}, "ops"},
		{"lab operator moves an ops device into lab", labOp, subjects.VerbDeviceGroups, true, model.DeviceGroups{Ref: opsCr.PublicKey(), Groups: []string{"lab"}}, "may act only on devices of groups lab"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cl.Call(ctx, tc.verb, tc.w, tc.args, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a refusal naming %q", err, tc.want)
			}
		})
	}
	opsAfter, err := owner.Device(ctx, opsCr.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	if opsAfter.Pin != nil || strings.Join(opsAfter.Groups, ",") != strings.Join(opsBefore.Groups, ",") {
		t.Fatalf("the ops device changed: %+v → %+v", opsBefore.Device, opsAfter.Device)
	}
	// Within its group the operator may pin.
	var v model.DeviceView
	if err := labOp.Call(ctx, subjects.VerbDevicePin, true, model.DevicePin{Ref: labCr.PublicKey(), ReleaseID: rel.ID}, &v); err != nil || v.Pin == nil {
		t.Fatalf("lab operator pinning a lab device: %+v %v", v.Pin, err)
	}
}
