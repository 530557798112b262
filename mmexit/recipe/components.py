"""The one explicit table of component names a recipe may use.

A recipe names a component either by a short name listed here (``name: maxprob``) or by a dotted
path (``_target_: my_package.rules.MyRule``). Nothing registers itself on import: to add a
component, add a line here.
"""

COMPONENTS: dict[str, dict[str, str]] = {
    # how an exit decides at inference (mmexit.exits.base.ExitRule subclasses)
    "rule": {
        "maxprob": "mmexit.exits.confidence.MaxProbRule",
        "entropy": "mmexit.exits.confidence.EntropyRule",
        "patience": "mmexit.exits.patience.PatienceRule",
        "never": "mmexit.exits.confidence.NeverExitRule",
        "fixed": "mmexit.exits.confidence.FixedExitRule",
        "energy": "mmexit.exits.energy.EnergyRule",
        "beem": "mmexit.exits.beem.BEEMRule",
        "pcee": "mmexit.exits.pcee.PCEERule",
        "saturation": "mmexit.exits.saturation.SaturationRule",
    },
    # how the exits are trained (text classification losses, mmexit.training)
    "loss": {
        "joint": "mmexit.training.joint.JointLoss",
        "final_only": "mmexit.training.joint.FinalOnlyLoss",
        "internal_exits": "mmexit.training.joint.InternalExitsLoss",
        "sweet": "mmexit.training.sweet.SweetLoss",
        "cosee": "mmexit.training.cosee.COSEELoss",
    },
    # how a rule's parameters are set on the calibration split (mmexit.calibration)
    "calibration": {
        "temperature": "mmexit.calibration.temperature.TemperatureCalibration",
        "beem": "mmexit.calibration.beem.BEEMCalibration",
        "pcee": "mmexit.calibration.pcee.PCEECalibration",
        "ltt": "mmexit.calibration.ltt.LTTCalibration",
    },
}
