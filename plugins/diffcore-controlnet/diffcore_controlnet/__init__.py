"""ControlNet training for diffcore: a ControlNet beside a frozen backbone, in the diffusers and ComfyUI layouts."""
