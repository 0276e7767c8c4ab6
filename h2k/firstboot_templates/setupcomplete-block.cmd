@rem hyper2kvm first boot: begin (registers task @TASK@, returns at once)
@"%SystemRoot%\System32\cmd.exe" /c ""@BOOTSTRAP@" setupcomplete"
@rem hyper2kvm first boot: end
