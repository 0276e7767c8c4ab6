@echo off
rem hyper2kvm first boot, bootstrap (argument: the hook that started it).
rem It registers the scheduled task that runs the first-boot steps in the background,
rem starts it, and returns at once: it runs before the logon screen (Setup\CmdLine,
rem SetupComplete.cmd) or at the first logon (RunOnce), so it only calls schtasks
rem and reg, which wait for nothing. If schtasks fails the hook is kept for @MAX_TRIES@
rem boots in all (state\bootstrap.tries), then given up.
setlocal EnableExtensions
set "H2K=@STAGING@"
set "LOG=%H2K%\firstboot.log"
set "STATE=%H2K%\state"
set "SYS=%SystemRoot%\System32"
if exist "%H2K%\firstboot.done" goto restore
if not exist "%STATE%" mkdir "%STATE%"
>>"%LOG%" echo %DATE% %TIME% bootstrap from %~1
set TRIES=0
if exist "%STATE%\bootstrap.tries" set /p TRIES=<"%STATE%\bootstrap.tries"
set /a TRIES+=1
>"%STATE%\bootstrap.tries" echo %TRIES%
"%SYS%\schtasks.exe" /create /tn @TASK@ /xml "%H2K%\@TASK@.xml" /f >>"%LOG%" 2>&1
if errorlevel 1 goto failed
"%SYS%\schtasks.exe" /run /tn @TASK@ >>"%LOG%" 2>&1
>>"%LOG%" echo %DATE% %TIME% bootstrap: task @TASK@ registered and started
goto restore
:failed
>>"%LOG%" echo %DATE% %TIME% bootstrap: schtasks /create failed, try %TRIES% of @MAX_TRIES@
if %TRIES% LSS @MAX_TRIES@ goto end
>>"%LOG%" echo %DATE% %TIME% bootstrap: giving up, hook removed
:restore
@RESTORE@
:end
endlocal
exit /b 0
